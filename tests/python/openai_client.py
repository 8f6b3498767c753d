"""Drives a running Pagoda server with the official `openai` Python package.

Usage: openai_client.py BASE_URL   (the server runs the tiny-llama fixture as "tiny" with API key
"test-key"). Exits non-zero on the first failed check.
"""

import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="test-key")

models = client.models.list()
assert [m.id for m in models.data] == ["tiny"], models

# Completions, greedy: deterministic, and the same text twice.
first = client.completions.create(model="tiny", prompt="The licensor grants you", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
again = client.completions.create(model="tiny", prompt="The licensor grants you", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
assert first.choices[0].text == again.choices[0].text and first.choices[0].text, first
assert first.choices[0].finish_reason == "length"
assert first.usage.completion_tokens == 12, first.usage

# Streaming completions concatenate to the same text.
chunks = client.completions.create(model="tiny", prompt="The licensor grants you", max_tokens=12, temperature=0,
                                   stream=True, extra_body={"ignore_eos": True})
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
assert streamed == first.choices[0].text, (streamed, first.choices[0].text)

# n > 1 with a seed: n choices, indexed 0..n-1.
many = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=3,
                                 extra_body={"ignore_eos": True})
assert sorted(c.index for c in many.choices) == [0, 1, 2], many

# A loglikelihood as lm-evaluation-harness asks for it: the prompt echoed with its logprobs, nothing
# generated; and the same numbers from vLLM's prompt_logprobs.
ll = client.completions.create(model="tiny", prompt="The licensor grants you a license", max_tokens=0, echo=True,
                               logprobs=1, temperature=0)
lp = ll.choices[0].logprobs
assert ll.choices[0].text == "The licensor grants you a license", ll
assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
assert len(lp.tokens) == ll.usage.prompt_tokens and all(x < 0 for x in lp.token_logprobs[1:]), lp
plp = client.completions.create(model="tiny", prompt="The licensor grants you a license", max_tokens=1,
                                extra_body={"prompt_logprobs": 1})
positions = plp.choices[0].model_extra["prompt_logprobs"]
assert positions[0] is None and len(positions) == len(lp.tokens), positions
for k in range(1, len(positions)):
    ours = [v for v in positions[k].values()][0]
    assert abs(ours["logprob"] - lp.token_logprobs[k]) < 1e-5, (k, ours, lp.token_logprobs[k])

# Chat, plain and streamed, with logprobs.
chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What does this license allow?"}],
                                      max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
                                      extra_body={"ignore_eos": True})
message = chat.choices[0].message
assert message.role == "assistant" and message.content, chat
assert len(chat.choices[0].logprobs.content) == 10
assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3
stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What does this license allow?"}],
                                        max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
parts, usage = [], None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        parts.append(choice.delta.content or "")
assert "".join(parts) == message.content, ("".join(parts), message.content)
assert usage is not None and usage.completion_tokens == 10, usage

# Chat with n = 2 streamed: both indexes arrive.
stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
                                        stream=True, extra_body={"ignore_eos": True})
indexes = {choice.index for chunk in stream for choice in chunk.choices}
assert indexes == {0, 1}, indexes

# Errors map to the client's exception classes.
try:
    client.completions.create(model="nope", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError:
    pass
try:
    client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    raise AssertionError("a prompt beyond the context must fail")
except openai.BadRequestError as e:
    assert "maximum context length" in str(e), e
try:
    openai.OpenAI(base_url=base_url, api_key="wrong").models.list()
    raise AssertionError("a wrong key must fail")
except openai.AuthenticationError:
    pass

print("all openai client checks passed")
