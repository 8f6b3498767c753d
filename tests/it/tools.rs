//! Tool calling (issue 13, section 2) through the real server and the `openai` client, and tool
//! messages through the chat template as vLLM renders them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::common::tool_missing;
use crate::http::post;
use crate::server::tiny_llama_server;

#[test]
fn tool_calls_are_valid_for_every_seed_and_each_parser_finds_its_familys_calls() {
    let python = match crate::operations::python_with_openai() {
        Ok(p) => p,
        Err(why) => return tool_missing(&format!("the tool calling test needs Python with openai: {why}")),
    };
    let plain = tiny_llama_server(&["--served-model-name", "tiny"]);
    let parsers: Vec<_> = ["hermes", "llama3_json", "mistral"]
        .iter()
        .map(|p| {
            tiny_llama_server(&["--served-model-name", "tiny", "--enable-auto-tool-choice", "--tool-call-parser", p])
        })
        .collect();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/tool_calls.py");
    let urls: Vec<String> =
        std::iter::once(&plain).chain(&parsers).map(|s| format!("http://127.0.0.1:{}/v1", s.port)).collect();
    let out = Command::new(python).arg(script).args(&urls).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tool calls failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        parsers[0].log()
    );
    assert!(stdout.contains("all tool call checks passed"), "{stdout}");
}

#[test]
fn tool_messages_and_calls_reach_the_template_with_their_arguments_as_objects() {
    let template = "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}\
        {{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% elif m.role == 'tool' %}\
        [{{ m.tool_call_id }}={{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}\
        {% for t in tools %}<{{ t.function.name }}>{% endfor %}";
    let server = tiny_llama_server(&["--chat-template", template]);
    let messages = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]);
    let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let rendered = post(server.port, "/tokenize", &json!({"messages": messages, "tools": tools})).json();
    let expected = post(
        server.port,
        "/tokenize",
        &json!({"prompt": "weather?weather(Paris)[call_1=sunny]<weather>", "add_special_tokens": false}),
    )
    .json();
    assert_eq!(rendered["tokens"], expected["tokens"]);
}
