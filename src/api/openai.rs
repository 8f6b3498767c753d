//! The wire types of the OpenAI API and vLLM's extensions to it; field names are the API's. With
//! the sync state files (`storage::manifest`), these are the only types that derive `Serialize`.
//!
//! Requests ignore fields they do not know (clients send many); known fields with the wrong type
//! are rejected with the field named.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// `prompt` of a completion request: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Prompt, D::Error> {
        let bad = || {
            serde::de::Error::custom(
                "must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
            )
        };
        let token = |v: &Value| v.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32);
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Prompt::Texts(vec![s])),
            Value::Array(items) if items.is_empty() => Err(bad()),
            Value::Array(items) => match &items[0] {
                Value::String(_) => items
                    .into_iter()
                    .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                    .collect::<Result<_, _>>()
                    .map(Prompt::Texts),
                Value::Number(_) => items
                    .iter()
                    .map(|v| token(v).ok_or_else(bad))
                    .collect::<Result<_, _>>()
                    .map(|t| Prompt::Tokens(vec![t])),
                Value::Array(_) => items
                    .iter()
                    .map(|list| list.as_array().ok_or_else(bad)?.iter().map(|v| token(v).ok_or_else(bad)).collect())
                    .collect::<Result<_, _>>()
                    .map(Prompt::Tokens),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// A request field of OpenAI's API or vLLM's that Pagoda does not implement (yet): present with
/// any value but one of `neutral` (those that ask for the default behaviour), it is refused with a
/// 400. A field is implemented or refused, never accepted and ignored; fields no API defines are
/// ignored (clients send many).
pub struct UnsupportedField {
    pub name: &'static str,
    pub neutral: fn() -> Vec<Value>,
    /// `true`: chat completions only (completions implement it).
    pub chat_only: bool,
}

const fn field(name: &'static str, neutral: fn() -> Vec<Value>) -> UnsupportedField {
    UnsupportedField { name, neutral, chat_only: false }
}

fn null() -> Vec<Value> {
    vec![Value::Null]
}

fn null_or_false() -> Vec<Value> {
    vec![Value::Null, Value::Bool(false)]
}

pub const UNSUPPORTED_FIELDS: &[UnsupportedField] = &[
    field("logits_processors", null),
    field("priority", || vec![Value::Null, Value::from(0)]),
    field("use_beam_search", null_or_false),
    field("length_penalty", || vec![Value::Null, Value::from(1), Value::from(1.0)]),
    field("spaces_between_special_tokens", || vec![Value::Null, Value::Bool(true)]),
    field("detokenize", || vec![Value::Null, Value::Bool(true)]),
    field("prompt_embeds", null),
    field("cache_salt", null),
    field("kv_transfer_params", null),
    field("vllm_xargs", null),
    field("mm_processor_kwargs", null),
    field("reasoning_effort", null),
    field("prediction", null),
    field("audio", null),
    field("modalities", || vec![Value::Null, Value::Array(vec![Value::from("text")])]),
    field("web_search_options", null),
    UnsupportedField { name: "functions", neutral: null, chat_only: true },
    UnsupportedField { name: "function_call", neutral: || vec![Value::Null, Value::from("none")], chat_only: true },
    UnsupportedField { name: "documents", neutral: null, chat_only: true },
    UnsupportedField { name: "chat_template", neutral: null, chat_only: true },
    UnsupportedField { name: "echo", neutral: null_or_false, chat_only: true },
];

/// The first field of `body` that asks for something Pagoda does not implement, with why.
pub fn unsupported_field(body: &Value, chat: bool) -> Option<(&'static str, String)> {
    let object = body.as_object()?;
    for f in UNSUPPORTED_FIELDS.iter().filter(|f| chat || !f.chat_only) {
        if let Some(value) = object.get(f.name)
            && !(f.neutral)().contains(value)
        {
            let why = match f.name {
                "functions" | "function_call" => "use tools and tool_choice, which replaced them",
                _ => "Pagoda does not implement it yet",
            };
            return Some((f.name, format!("{} = {value} is not supported: {why}", f.name)));
        }
    }
    if let Some(options) = object.get("stream_options").filter(|o| !o.is_null()) {
        if !object.get("stream").is_some_and(|s| s == true) {
            return Some(("stream_options", "stream_options is only allowed when stream is true".into()));
        }
        let asks = |k: &str| options.get(k).is_some_and(|v| v == true);
        if asks("continuous_usage_stats") && !asks("include_usage") {
            return Some((
                "stream_options.continuous_usage_stats",
                "stream_options.continuous_usage_stats needs stream_options.include_usage".into(),
            ));
        }
    }
    None
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Default)]
pub struct Stop(pub Vec<String>);

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Stop, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        match Option::<Either>::deserialize(d)
            .map_err(|_| serde::de::Error::custom("must be a string or a list of strings"))?
        {
            None => Ok(Stop(Vec::new())),
            Some(Either::One(s)) => Ok(Stop(vec![s])),
            Some(Either::Many(v)) => Ok(Stop(v)),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// `null` means false, as in vLLM.
    #[serde(default, deserialize_with = "null_is_false")]
    pub include_usage: bool,
    /// vLLM: every chunk carries the usage so far (with `include_usage`).
    #[serde(default, deserialize_with = "null_is_false")]
    pub continuous_usage_stats: bool,
}

/// A boolean that may also be sent as `null` (meaning false), as clients do.
fn null_is_false<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Sampling fields shared by completions and chat completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stop: Stop,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub user: Option<String>,
    // vLLM's extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    // Structured outputs: OpenAI's `response_format`, vLLM's `structured_outputs`, and vLLM's
    // older `guided_*` fields.
    pub response_format: Option<ResponseFormat>,
    pub structured_outputs: Option<StructuredOutputsParams>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub guided_whitespace_pattern: Option<String>,
    pub guided_decoding_backend: Option<String>,
    pub allowed_token_ids: Option<Vec<u32>>,
    pub bad_words: Option<Vec<String>>,
    /// Keep only this many of the prompt's last tokens (-1: as many as the context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// Each choice carries `token_ids`, and the response the prompt's (`prompt_token_ids`).
    pub return_token_ids: Option<bool>,
    /// Logprobs name tokens as `token_id:<id>` instead of their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's logprobs of the prompt's tokens, with this many top alternatives (-1: the whole
    /// vocabulary, within `--max-logprobs`).
    pub prompt_logprobs: Option<i64>,
}

/// `response_format`: `text`, `json_object`, or `json_schema` with its schema.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    /// `name`, `description`: labels for the client's own use, which change no output.
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: one constraint, and options for JSON.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputsParams {
    /// A schema, or its JSON text.
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
    pub structural_tag: Option<Value>,
    /// Pagoda has one grammar engine and never falls back, so this holds either way.
    #[serde(default, rename = "disable_fallback")]
    pub _disable_fallback: Option<bool>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub disable_any_whitespace: bool,
    #[serde(default, deserialize_with = "null_is_false")]
    pub disable_additional_properties: bool,
    pub whitespace_pattern: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u32>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub echo: bool,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
    /// vLLM: whether the tokenizer adds special tokens (BOS) to text prompts.
    pub add_special_tokens: Option<bool>,
    /// Read from the same JSON object separately (see `api::read_request`), so that errors in
    /// these fields name the field.
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// A message's `content`: text, or a list of parts of which only text parts are supported.
#[derive(Debug, Clone, Default)]
pub struct Content(pub Option<String>);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Content, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(Content(None)),
            Value::String(s) => Ok(Content(Some(s))),
            Value::Array(parts) => {
                let mut texts = Vec::new();
                for part in parts {
                    match (part.get("type").and_then(|t| t.as_str()), part.get("text").and_then(|t| t.as_str())) {
                        (Some("text"), Some(text)) => texts.push(text.to_string()),
                        (Some(other), _) if other != "text" => {
                            return Err(serde::de::Error::custom(format!(
                                "content parts of type '{other}' are not supported; only text is"
                            )));
                        }
                        _ => {
                            return Err(serde::de::Error::custom(
                                "a content part needs \"type\": \"text\" and a \"text\" string",
                            ));
                        }
                    }
                }
                Ok(Content(Some(texts.join("\n"))))
            }
            _ => Err(serde::de::Error::custom("must be a string, a list of content parts, or null")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Content,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// The message as chat templates see it.
    pub fn to_template_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), Value::String(self.role.clone()));
        m.insert("content".into(), self.content.0.clone().map_or(Value::Null, Value::String));
        if let Some(name) = &self.name {
            m.insert("name".into(), Value::String(name.clone()));
        }
        if let Some(calls) = &self.tool_calls {
            // As vLLM hands them to templates: each call's `arguments` JSON text as an object,
            // so that templates can iterate it or `tojson` it once.
            let mut calls = calls.clone();
            for call in calls.as_array_mut().into_iter().flatten() {
                if let Some(args) = call.pointer_mut("/function/arguments")
                    && let Some(parsed) = args.as_str().and_then(|a| serde_json::from_str::<Value>(a).ok())
                {
                    *args = parsed;
                }
            }
            m.insert("tool_calls".into(), calls);
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), Value::String(id.clone()));
        }
        Value::Object(m)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    // vLLM's extensions.
    pub add_generation_prompt: Option<bool>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub continue_final_message: bool,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Read from the same JSON object separately (see `api::read_request`).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// vLLM's `/tokenize`: a prompt, or chat messages.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub continue_final_message: bool,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub return_token_strs: bool,
    /// Tools for the chat template, as in a chat request.
    pub tools: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// The legacy (completions) logprobs format.
#[derive(Debug, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    /// In rank order (the JSON object keeps insertion order); tokens with the same text share
    /// one key, as in OpenAI's format.
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM: the stop string or token id that ended the output.
    pub stop_reason: Option<Value>,
    /// vLLM's `return_token_ids`: the prompt's ids (in a stream, on the choice's first chunk) and
    /// the generated ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs`, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// vLLM's `prompt_logprobs` format: `null` for the first prompt token (nothing predicts it), then
/// for each later one an object keyed by token id (the prompt's token first, then the most likely
/// ones) of `{"logprob", "rank", "decoded_token"}`.
pub type PromptLogprobs = Vec<Option<serde_json::Map<String, Value>>>;

#[derive(Debug, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
}

/// A streamed completion's chunk: `usage` is absent unless the stream asked for it, then `null`
/// until the last chunk, as OpenAI sends it.
#[derive(Debug, Serialize)]
pub struct CompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// The chat logprobs format.
#[derive(Debug, Serialize, Clone)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize, Clone)]
pub struct ChatLogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatLogprobEntry>,
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when the message is only tool calls.
    pub content: Option<String>,
    /// Always `null`: Pagoda's models do not refuse through a separate channel.
    pub refusal: Option<String>,
    pub tool_calls: Vec<ToolCallOut>,
}

/// A tool call in a response; in a stream chunk, `index` orders the calls of one choice.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs` of the rendered chat, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Debug, Serialize, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// With `return_token_ids`, on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: u16,
}

#[derive(Debug, Serialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(json: &str) -> Result<Prompt, String> {
        serde_json::from_str::<Prompt>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn prompts_come_in_four_shapes() {
        assert!(matches!(prompt(r#""hi""#), Ok(Prompt::Texts(t)) if t == ["hi"]));
        assert!(matches!(prompt(r#"["a", "b"]"#), Ok(Prompt::Texts(t)) if t.len() == 2));
        assert!(matches!(prompt("[1, 2, 3]"), Ok(Prompt::Tokens(t)) if t == [vec![1, 2, 3]]));
        assert!(matches!(prompt("[[1], [2, 3]]"), Ok(Prompt::Tokens(t)) if t.len() == 2));
        for bad in ["[]", "[1, \"a\"]", "[-1]", "5", "[[1], 2]", "[1.5]"] {
            assert!(prompt(bad).unwrap_err().starts_with("must be a string"), "{bad}");
        }
    }

    #[test]
    fn content_parts_are_joined_and_other_kinds_refused() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content.0.as_deref(), Some("a\nb"));
        let err = serde_json::from_str::<ChatMessage>(
            r#"{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("'image_url' are not supported"));
    }

    #[test]
    fn null_booleans_mean_false() {
        let r: CompletionRequest = serde_json::from_str(r#"{"prompt": "a", "stream": null, "echo": null}"#).unwrap();
        assert!(!r.stream && !r.echo);
        let r: ChatRequest =
            serde_json::from_str(r#"{"messages": [], "logprobs": null, "stream_options": {"include_usage": null}}"#)
                .unwrap();
        assert!(!r.logprobs && !r.stream_options.unwrap().include_usage);
    }

    #[test]
    fn stop_accepts_one_or_many() {
        let r: SamplingFields = serde_json::from_str(r#"{"stop": "x"}"#).unwrap();
        assert_eq!(r.stop.0, vec!["x"]);
        let r: SamplingFields = serde_json::from_str(r#"{"stop": ["x", "y"]}"#).unwrap();
        assert_eq!(r.stop.0.len(), 2);
        assert!(serde_json::from_str::<SamplingFields>(r#"{"stop": 3}"#).is_err());
    }
}
