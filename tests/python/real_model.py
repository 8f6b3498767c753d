"""The official openai client asks Pagoda serving the real SmolLM2-135M-Instruct (GGUF, Q4_1) real
questions. Usage: real_model.py BASE_URL (the server's /v1)."""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="unused")

completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2, temperature=0)
choice = completion.choices[0]
assert choice.text == " Paris.", completion
assert choice.finish_reason == "length", completion
assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 2, completion.usage

chat = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=32,
)
choice = chat.choices[0]
# The turn ends with <|im_end|>, which stops generation and is not part of the text.
assert choice.message.content == "The capital of France is Paris.", chat
assert choice.finish_reason == "stop", chat

stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=32,
    stream=True,
)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
assert text == "The capital of France is Paris.", text
print("the real model answered: The capital of France is Paris.")

# Structured outputs on a real model: the schema holds and the answer is still right.
import json

chat = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
    temperature=0,
    max_tokens=60,
    response_format={
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                "required": ["country", "capital"],
                "additionalProperties": False,
            },
        },
    },
)
choice = chat.choices[0]
answer = json.loads(choice.message.content)
assert choice.finish_reason == "stop", chat
assert set(answer) == {"country", "capital"} and answer["capital"] == "Paris", answer
print("the real model answered in JSON:", choice.message.content)
