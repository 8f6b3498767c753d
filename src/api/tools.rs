//! Tool calling on chat completions: a request's `tools` and `tool_choice` checked and turned into
//! a [`ToolMode`] (with, for `required` and a named function, the structured output that makes
//! the model's answer a valid call), and the calls read back out of the model's text by the
//! parser `--tool-call-parser` names, as vLLM's parsers of the same names read them.

use serde_json::{Value, json};

use super::ApiError;
use crate::engine::structured::{JsonOptions, StructuredOutput};

/// `--tool-call-parser`: the format a model family writes its tool calls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolParser {
    /// Llama 3.x: `{"name": …, "parameters": {…}}` (after an optional `<|python_tag|>`), several
    /// separated by `;`.
    #[value(name = "llama3_json")]
    Llama3Json,
    /// Hermes, Qwen2.5 and later: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
    Hermes,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}]`, or `[TOOL_CALLS]name[ARGS]{…}`.
    Mistral,
}

/// How a chat request's output is read for tool calls.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolMode {
    /// Plain text (no tools, or `tool_choice: none`).
    None,
    /// The model may call tools; the parser finds the calls in its text.
    Auto(ToolParser),
    /// At least one call (one at most without parallel calls): the output is held to a JSON list
    /// of `{"name", "parameters"}`.
    Required,
    /// One call of this function: the output is held to its parameters' schema.
    Named(String),
}

/// A tool call as the response carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text, as OpenAI's API carries it.
    pub arguments: String,
}

/// What the server was started with (`--enable-auto-tool-choice`, `--tool-call-parser`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ToolConfig {
    pub auto_tool_choice: bool,
    pub parser: Option<ToolParser>,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; gives the mode and the constraint
/// that `required` and a named function put on the output (a JSON schema shaped by `options`).
pub fn plan(
    config: ToolConfig,
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
    options: JsonOptions,
) -> Result<(ToolMode, Option<StructuredOutput>), ApiError> {
    let bad = |message: String, param: &str| Err(ApiError::bad_request(message, Some(param)));
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().enumerate().map(|(i, t)| tool(i, t)).collect::<Result<_, _>>()?,
        Some(_) => return bad("tools must be a list of function tools".into(), "tools"),
    };
    for (i, (name, _)) in tools.iter().enumerate() {
        if tools[..i].iter().any(|(other, _)| other == name) {
            return bad(format!("tools define the function '{name}' twice"), "tools");
        }
    }
    let choice = match tool_choice {
        None | Some(Value::Null) if tools.is_empty() => "none".to_string(),
        // With tools and no choice, the model chooses, as in OpenAI's API and vLLM.
        None | Some(Value::Null) => "auto".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => format!("function:{name}"),
                _ => {
                    return bad(
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}"
                            .into(),
                        "tool_choice",
                    );
                }
            }
        }
        Some(_) => return bad("tool_choice must be a string or an object".into(), "tool_choice"),
    };
    if choice != "none" && tools.is_empty() {
        return bad(format!("tool_choice '{choice}' needs tools"), "tool_choice");
    }
    match choice.as_str() {
        "none" => Ok((ToolMode::None, None)),
        "auto" => match (config.auto_tool_choice, config.parser) {
            (true, Some(parser)) => Ok((ToolMode::Auto(parser), None)),
            _ => bad(
                "\"auto\" tool choice requires the server to run with --enable-auto-tool-choice and \
                 --tool-call-parser (or send tool_choice \"none\", \"required\" or a named function)"
                    .into(),
                "tool_choice",
            ),
        },
        "required" => {
            // Each tool's `$defs` move to the root, where its `$ref`s (`#/$defs/…`) point.
            let mut defs = serde_json::Map::new();
            let mut calls = Vec::new();
            for (name, parameters) in &tools {
                let mut parameters = parameters.clone();
                if let Some(Value::Object(own)) = parameters.as_object_mut().and_then(|p| p.remove("$defs")) {
                    for (key, def) in own {
                        if defs.get(&key).is_some_and(|d| *d != def) {
                            return bad(
                                format!("two tools define '$defs/{key}' differently; tool_choice required needs one"),
                                "tools",
                            );
                        }
                        defs.insert(key, def);
                    }
                }
                calls.push(json!({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                                  "required": ["name", "parameters"], "additionalProperties": false}));
            }
            let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            if !defs.is_empty() {
                schema["$defs"] = Value::Object(defs);
            }
            if parallel_tool_calls == Some(false) {
                schema["maxItems"] = json!(1);
            }
            Ok((ToolMode::Required, Some(StructuredOutput::Json { schema, options })))
        }
        named => {
            let Some(name) = named.strip_prefix("function:") else {
                return bad(
                    format!("unknown tool_choice '{named}': use none, auto, required or a function"),
                    "tool_choice",
                );
            };
            let Some((_, parameters)) = tools.iter().find(|(n, _)| n == name) else {
                return bad(
                    format!("tool_choice names the function '{name}', which tools do not define"),
                    "tool_choice",
                );
            };
            let schema = parameters.clone();
            Ok((ToolMode::Named(name.to_string()), Some(StructuredOutput::Json { schema, options })))
        }
    }
}

/// One entry of `tools`: its function's name and parameters' schema (any object without one).
fn tool(i: usize, t: &Value) -> Result<(String, Value), ApiError> {
    let bad = |what: &str| ApiError::bad_request(format!("tools[{i}] {what}"), Some("tools"));
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("must have \"type\": \"function\""));
    }
    let function = t.get("function").ok_or_else(|| bad("needs a function"))?;
    let name = function.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| bad("needs a function name"))?;
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(bad("parameters must be a JSON schema object")),
    };
    Ok((name.to_string(), parameters))
}

/// A new call id in vLLM's form (Mistral's templates want nine letters and digits).
pub fn call_id(parser: Option<ToolParser>) -> String {
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    match parser {
        Some(ToolParser::Mistral) => uuid[..9].to_string(),
        _ => format!("chatcmpl-tool-{uuid}"),
    }
}

/// The model's finished text read for tool calls: the text that is not a call (`None` if there is
/// none) and the calls. Text that does not parse as the mode's calls stays text, with no call.
pub fn extract(mode: &ToolMode, text: &str) -> (Option<String>, Vec<ToolCall>) {
    let plain = || (Some(text.to_string()), Vec::new());
    let parsed = match mode {
        ToolMode::None => return plain(),
        ToolMode::Auto(parser) => parse(*parser, text),
        ToolMode::Required => serde_json::from_str::<Vec<Value>>(text.trim()).ok().and_then(|calls| {
            let calls: Option<Vec<ToolCall>> = calls.iter().map(|c| call(c, "parameters", None)).collect();
            Some((None, calls?))
        }),
        ToolMode::Named(name) => serde_json::from_str::<Value>(text.trim())
            .ok()
            .map(|args| (None, vec![ToolCall { id: call_id(None), name: name.clone(), arguments: args.to_string() }])),
    };
    match parsed {
        Some((content, calls)) if !calls.is_empty() => (content.filter(|c| !c.trim().is_empty()), calls),
        _ => plain(),
    }
}

/// `{"name": …, <arguments_key>: …}` as a call; the arguments may also be JSON text already.
fn call(value: &Value, arguments_key: &str, parser: Option<ToolParser>) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_string();
    let arguments =
        match value.get(arguments_key).or_else(|| value.get("arguments")).or_else(|| value.get("parameters")) {
            None | Some(Value::Null) => "{}".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
    Some(ToolCall { id: call_id(parser), name, arguments })
}

/// JSON values one after another from the start of `text`, each optionally followed by `sep`;
/// `None` unless the whole text is such values.
fn json_values(text: &str, sep: char) -> Option<Vec<Value>> {
    let mut values = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        rest = rest[stream.byte_offset()..].trim_start();
        rest = rest.strip_prefix(sep).unwrap_or(rest).trim_start();
        values.push(value);
    }
    Some(values)
}

/// The first JSON value at the start of `text` and what follows it.
fn json_prefix(text: &str) -> Option<(Value, &str)> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    Some((value, &text[stream.byte_offset()..]))
}

fn parse(parser: ToolParser, text: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
    let p = Some(parser);
    match parser {
        ToolParser::Llama3Json => {
            let body = text.trim_start();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
            if !body.trim_start().starts_with('{') {
                return None;
            }
            let calls = json_values(body, ';')?.iter().map(|v| call(v, "parameters", p)).collect::<Option<Vec<_>>>()?;
            Some((None, calls))
        }
        ToolParser::Hermes => {
            const OPEN: &str = "<tool_call>";
            let start = text.find(OPEN)?;
            let mut calls = Vec::new();
            let mut rest = &text[start..];
            while let Some(after) = rest.strip_prefix(OPEN) {
                let (value, tail) = json_prefix(after.trim_start())?;
                calls.push(call(&value, "arguments", p)?);
                let tail = tail.trim_start();
                rest = tail.strip_prefix("</tool_call>").unwrap_or(tail).trim_start();
            }
            Some((Some(text[..start].to_string()), calls))
        }
        ToolParser::Mistral => {
            const MARK: &str = "[TOOL_CALLS]";
            let start = text.find(MARK)?;
            let mut calls = Vec::new();
            for part in text[start..].split(MARK).map(str::trim).filter(|s| !s.is_empty()) {
                if part.starts_with('[') {
                    // The v3 format: a JSON list of calls.
                    let (Value::Array(list), _) = json_prefix(part)? else { return None };
                    for v in &list {
                        calls.push(call(v, "arguments", p)?);
                    }
                } else {
                    // The v11 format: name[ARGS]{…}.
                    let (name, args) = part.split_once("[ARGS]")?;
                    let (args, _) = json_prefix(args.trim_start())?;
                    calls.push(ToolCall { id: call_id(p), name: name.trim().to_string(), arguments: args.to_string() });
                }
            }
            Some((Some(text[..start].to_string()), calls))
        }
    }
}

/// Where a streamed auto-mode output may start a call: text from here on is held back until the
/// output ends and is parsed then. `None` while the text is plain so far. For Llama 3, whose
/// calls are the whole output, the caller asks only while nothing has been sent.
pub fn call_start(parser: ToolParser, text: &str) -> Option<usize> {
    let marker = match parser {
        ToolParser::Hermes => "<tool_call>",
        ToolParser::Mistral => "[TOOL_CALLS]",
        ToolParser::Llama3Json => {
            let trimmed = text.trim_start();
            return (trimmed.starts_with('{') || trimmed.starts_with("<|python_tag|>") || trimmed.is_empty())
                .then_some(0);
        }
    };
    if let Some(at) = text.find(marker) {
        return Some(at);
    }
    // A marker may be arriving: hold back the longest end of the text that begins it.
    (1..marker.len()).rev().find(|&n| text.ends_with(&marker[..n])).map(|n| text.len() - n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(calls: &[ToolCall]) -> Vec<(&str, Value)> {
        calls.iter().map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).unwrap())).collect()
    }

    #[test]
    fn each_parser_reads_its_family_format_and_leaves_plain_text_alone() {
        let (content, calls) = extract(
            &ToolMode::Auto(ToolParser::Hermes),
            "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>",
        );
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(names(&calls), vec![("weather", json!({"city": "Paris"})), ("time", json!({}))]);
        assert!(calls[0].id.starts_with("chatcmpl-tool-"));

        let (content, calls) = extract(
            &ToolMode::Auto(ToolParser::Llama3Json),
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"parameters\": {}}",
        );
        assert_eq!(content, None);
        assert_eq!(names(&calls), vec![("a", json!({"x": 1})), ("b", json!({}))]);

        let (_, calls) =
            extract(&ToolMode::Auto(ToolParser::Mistral), "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}]");
        assert_eq!(names(&calls), vec![("a", json!({"x": 1}))]);
        assert_eq!(calls[0].id.len(), 9);
        let (_, calls) =
            extract(&ToolMode::Auto(ToolParser::Mistral), "[TOOL_CALLS]a[ARGS]{\"x\": 2}[TOOL_CALLS]b[ARGS]{}");
        assert_eq!(names(&calls), vec![("a", json!({"x": 2})), ("b", json!({}))]);

        for parser in [ToolParser::Hermes, ToolParser::Llama3Json, ToolParser::Mistral] {
            let (content, calls) = extract(&ToolMode::Auto(parser), "Paris is the capital.");
            assert_eq!((content.as_deref(), calls.len()), (Some("Paris is the capital."), 0));
            // A broken call stays text.
            let broken = "<tool_call>{\"name\": [TOOL_CALLS]{\"name\": \"a\"";
            assert_eq!(extract(&ToolMode::Auto(parser), broken), (Some(broken.to_string()), vec![]));
        }
    }

    #[test]
    fn required_and_named_outputs_are_calls() {
        let (content, calls) = extract(
            &ToolMode::Required,
            "[{\"name\": \"a\", \"parameters\": {\"x\": 1}}, {\"name\": \"b\", \"parameters\": {}}]",
        );
        assert_eq!(content, None);
        assert_eq!(names(&calls), vec![("a", json!({"x": 1})), ("b", json!({}))]);
        let (content, calls) = extract(&ToolMode::Named("f".into()), "{\"q\": \"x\"}");
        assert_eq!((content, names(&calls)), (None, vec![("f", json!({"q": "x"}))]));
    }

    #[test]
    fn tool_choices_are_checked_against_the_tools() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let auto = ToolConfig { auto_tool_choice: true, parser: Some(ToolParser::Hermes) };
        let message = |e: ApiError| match e {
            ApiError::BadRequest { message, .. } => message,
            other => panic!("{other:?}"),
        };
        let err = |config, tools: Option<&Value>, choice: Value| {
            message(plan(config, tools, Some(&choice), None, JsonOptions::default()).unwrap_err())
        };
        assert!(err(ToolConfig::default(), Some(&tools), json!("auto")).contains("--enable-auto-tool-choice"));
        assert!(err(auto, None, json!("required")).contains("needs tools"));
        assert!(err(auto, Some(&tools), json!({"type": "function", "function": {"name": "g"}})).contains("'g'"));
        assert!(err(auto, Some(&tools), json!("sometimes")).contains("unknown tool_choice"));
        let twice = json!([tools[0], tools[0]]);
        assert!(message(plan(auto, Some(&twice), None, None, JsonOptions::default()).unwrap_err()).contains("twice"));
        assert_eq!(
            plan(auto, Some(&tools), None, None, JsonOptions::default()).unwrap().0,
            ToolMode::Auto(ToolParser::Hermes)
        );
        assert_eq!(
            plan(ToolConfig::default(), Some(&tools), Some(&json!("none")), None, JsonOptions::default()).unwrap().0,
            ToolMode::None
        );
        let (mode, spec) =
            plan(ToolConfig::default(), Some(&tools), Some(&json!("required")), Some(false), JsonOptions::default())
                .unwrap();
        assert_eq!(mode, ToolMode::Required);
        let Some(StructuredOutput::Json { schema, .. }) = spec else { panic!() };
        assert_eq!((schema["minItems"].clone(), schema["maxItems"].clone()), (json!(1), json!(1)));
        // $defs move to the root that their $refs name; the same name defined twice is refused.
        let with_defs = |def: Value| {
            json!({"type": "function", "function": {"name": "g", "parameters": {"type": "object",
                "properties": {"p": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": def}}}})
        };
        let both = json!([with_defs(json!({"type": "integer"})), tools[0]]);
        let (_, spec) =
            plan(ToolConfig::default(), Some(&both), Some(&json!("required")), None, JsonOptions::default()).unwrap();
        let Some(StructuredOutput::Json { schema, .. }) = spec else { panic!() };
        assert_eq!(schema["$defs"]["Point"], json!({"type": "integer"}));
        let mut clash = with_defs(json!({"type": "string"}));
        clash["function"]["name"] = json!("h");
        let clashing = json!([with_defs(json!({"type": "integer"})), clash]);
        let err = plan(ToolConfig::default(), Some(&clashing), Some(&json!("required")), None, JsonOptions::default());
        assert!(message(err.unwrap_err()).contains("differently"));
    }

    #[test]
    fn streamed_text_is_held_from_where_a_call_may_start() {
        assert_eq!(call_start(ToolParser::Hermes, "Sure. <tool_call>{"), Some(6));
        assert_eq!(call_start(ToolParser::Hermes, "Sure. <tool_"), Some(6));
        assert_eq!(call_start(ToolParser::Hermes, "Sure. <b>"), None);
        assert_eq!(call_start(ToolParser::Mistral, "ok [TOOL"), Some(3));
        assert_eq!(call_start(ToolParser::Llama3Json, " {\"name\""), Some(0));
        assert_eq!(call_start(ToolParser::Llama3Json, "Hello"), None);
    }
}
