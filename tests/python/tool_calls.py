"""Tool calling through the official `openai` client.

Usage: tool_calls.py PLAIN_URL HERMES_URL LLAMA3_URL MISTRAL_URL: four servers of the tiny-llama
fixture ("tiny": random weights), the first without tool flags, the others with
--enable-auto-tool-choice and the parser each is named after. `required` and a named function
must always yield valid calls, at temperature 1 over many seeds. The random model never writes a
call by itself, so the auto parsers are checked by holding its output to each family's call
format with a grammar: the parser must then find exactly that call.
Exits non-zero on the first failed check.
"""

import json
import sys

import jsonschema
import openai

plain, hermes, llama3, mistral = (openai.OpenAI(base_url=u, api_key="none") for u in sys.argv[1:5])
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "time", "parameters": TIME}},
]
SCHEMAS = {"weather": WEATHER, "time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
checked = 0


def check_calls(message, at_most=None):
    global checked
    assert message.tool_calls, message
    if at_most is not None:
        assert len(message.tool_calls) <= at_most, message.tool_calls
    for call in message.tool_calls:
        # vLLM's ids; Mistral's templates want nine letters and digits.
        assert call.type == "function" and (call.id.startswith("chatcmpl-tool-") or len(call.id) == 9), call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        checked += 1


# 1. required: at least one valid call for every seed, plain and streamed; one without parallel calls.
for seed in range(8):
    out = plain.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                        temperature=1.0, seed=seed, n=3, max_tokens=300, extra_body=COMPACT)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and choice.message.refusal is None, choice.message
        check_calls(choice.message)
    single = plain.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=300,
                                           extra_body=COMPACT)
    check_calls(single.choices[0].message, at_most=1)
    stream = plain.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=300, stream=True,
                                           extra_body=COMPACT)
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and calls, (finish, calls)
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])
        checked += 1

# 2. A named function: its arguments, every seed.
for seed in range(8):
    out = plain.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "time"}},
                                        temperature=1.0, seed=seed, n=2, max_tokens=100, extra_body=COMPACT)
    for choice in out.choices:
        assert [c.function.name for c in choice.message.tool_calls] == ["time"], choice.message
        check_calls(choice.message)

# 3. Errors: auto without the server flags, a choice without tools, an unknown function.
for kwargs, words in [
    ({"tools": TOOLS}, "--enable-auto-tool-choice"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
]:
    try:
        plain.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, **kwargs)
        raise AssertionError(f"accepted {kwargs}")
    except openai.BadRequestError as e:
        assert words in str(e), (words, e)
# tool_choice none: the tools reach the template, the answer is text.
out = plain.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=5,
                                    extra_body={"ignore_eos": True})
assert out.choices[0].message.tool_calls in (None, []) and out.choices[0].finish_reason == "length", out

# 4. The auto parsers find the calls their family writes (the output held to that format).
FORMATS = [
    (hermes, 'start: "I will check. <tool_call>" CALL "</tool_call>"\n'
             'CALL: /\\{"name": "weather", "arguments": \\{"city": "[a-z]{1,8}", "unit": "C"\\}\\}/', "I will check. "),
    (llama3, 'start: CALL\nCALL: /\\{"name": "weather", "parameters": \\{"city": "[a-z]{1,8}", "unit": "F"\\}\\}/', None),
    (mistral, 'start: "[TOOL_CALLS]" CALL\n'
              'CALL: /\\[\\{"name": "weather", "arguments": \\{"city": "[a-z]{1,8}", "unit": "C"\\}\\}\\]/', None),
]
for client, grammar, content in FORMATS:
    for seed in range(4):
        body = {"structured_outputs": {"grammar": grammar}}
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed,
                                             max_tokens=80, extra_body=body)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content == content, choice.message
        assert [c.function.name for c in choice.message.tool_calls] == ["weather"], choice.message
        check_calls(choice.message)
        if client is mistral:
            assert len(choice.message.tool_calls[0].id) == 9, choice.message.tool_calls[0].id
            continue
        # Streamed: the text before the call streams, the call arrives whole at the end.
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=1.0,
                                                seed=seed, max_tokens=80, stream=True, extra_body=body)
        text, calls, finish = "", [], None
        for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                calls += c.delta.tool_calls or []
                finish = c.finish_reason or finish
        assert text == (content or ""), text
        assert finish == "tool_calls" and [c.function.name for c in calls] == ["weather"], (finish, calls)
        assert calls[0].function.arguments == choice.message.tool_calls[0].function.arguments
    # Plain text stays text with the parser on.
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=30,
                                         extra_body={"structured_outputs": {"regex": "[a-z ]{5,20}\\."}})
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls, out

assert checked >= 80, checked
print(f"all tool call checks passed ({checked} calls)")
