"""Structured outputs through the official `openai` client, at temperature 1 over many seeds.

Usage: structured_outputs.py BASE_URL   (the server runs the tiny-llama fixture as "tiny": random
weights, so every token the grammar allows is likely and only the mask keeps the output valid).
Exits non-zero on the first failed check.
"""

import json
import re
import sys

import jsonschema
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
SEEDS = range(10)
N = 8

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
# Random weights would wander through whitespace for hundreds of tokens; real models do not.
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
checked = 0


def each_text(completion):
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        yield choice.text if hasattr(choice, "text") else choice.message.content


# 1. vLLM's structured_outputs.json on completions, with every sampling knob turned.
for seed in SEEDS:
    out = client.completions.create(
        model="tiny", prompt="A person:", max_tokens=300, temperature=1.0, top_p=0.95, seed=seed, n=N,
        extra_body={"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}, "top_k": 200,
                    "min_p": 0.001, "repetition_penalty": 1.2},
    )
    for text in each_text(out):
        jsonschema.validate(json.loads(text), PERSON)
        checked += 1

# 2. OpenAI's response_format json_schema on chat, plain and streamed.
schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
for seed in SEEDS:
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Describe someone."}], max_tokens=300,
        temperature=1.0, seed=seed, n=4, response_format=schema_format, extra_body=COMPACT,
    )
    for text in each_text(out):
        jsonschema.validate(json.loads(text), PERSON)
        checked += 1
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Describe someone."}], max_tokens=300,
        temperature=1.0, seed=seed, stream=True, response_format=schema_format, extra_body=COMPACT,
    )
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop", finish
    jsonschema.validate(json.loads("".join(parts)), PERSON)
    checked += 1

# 3. json_object: any JSON object.
ended = 0
for seed in SEEDS:
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please."}], max_tokens=400, temperature=1.0,
        seed=seed, n=2, response_format={"type": "json_object"},
        extra_body={"structured_outputs": {"disable_any_whitespace": True}, "top_k": 50},
    )
    for choice in out.choices:
        # An object may nest without bound; only one that ended is checked, and most must end.
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
            checked += 1
            ended += 1
assert ended >= len(SEEDS), f"only {ended} of {2 * len(SEEDS)} objects ended"

# 4. A choice always yields one of the choices, even with a strong bias towards other tokens.
CHOICES = ["yes", "no", "maybe so", "{\"x\": 1}"]
seen = set()
for seed in SEEDS:
    out = client.completions.create(
        model="tiny", prompt="Answer:", max_tokens=20, temperature=1.0, seed=seed, n=N,
        logit_bias={"300": 100, "301": 100},
        extra_body={"structured_outputs": {"choice": CHOICES}},
    )
    for text in each_text(out):
        assert text in CHOICES, text
        seen.add(text)
        checked += 1
assert len(seen) >= 3, seen

# 5. A regex always matches, streamed too.
EMAIL = r"[a-z]{1,8}@[a-z]{2,5}\.(com|org|net)"
for seed in SEEDS:
    out = client.completions.create(
        model="tiny", prompt="Email:", max_tokens=40, temperature=1.0, seed=seed, n=N,
        extra_body={"structured_outputs": {"regex": EMAIL}},
    )
    for text in each_text(out):
        assert re.fullmatch(EMAIL, text), text
        checked += 1
    stream = client.completions.create(
        model="tiny", prompt="Email:", max_tokens=40, temperature=1.0, seed=seed, stream=True,
        extra_body={"structured_outputs": {"regex": EMAIL}},
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert re.fullmatch(EMAIL, text), text
    checked += 1

# 6. A Lark grammar, and vLLM's older guided_* spelling of a regex.
GRAMMAR = 'start: "[" NUMBER ("," NUMBER)* "]"\nNUMBER: /[0-9]{1,3}/'
for seed in SEEDS:
    out = client.completions.create(
        model="tiny", prompt="List:", max_tokens=200, temperature=1.0, seed=seed, n=N,
        extra_body={"structured_outputs": {"grammar": GRAMMAR}},
    )
    for text in each_text(out):
        assert re.fullmatch(r"\[[0-9]{1,3}(,[0-9]{1,3})*\]", text), text
        checked += 1
    out = client.completions.create(
        model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, seed=seed,
        extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"},
    )
    for text in each_text(out):
        assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text), text
        checked += 1

# 7. An invalid schema is a 400 that names the problem.
try:
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
    )
    raise AssertionError("an invalid schema was accepted")
except openai.BadRequestError as e:
    assert "nonsense" in str(e), e

assert checked >= 400, checked
print(f"all structured output checks passed ({checked} outputs)")
