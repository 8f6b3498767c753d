//! Chat templates: the Jinja template a model ships, rendered with `minijinja` the way
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, Python string and dict methods,
//! `raise_exception`, `strftime_now`, and a `tojson` that writes what Python's `json.dumps` writes).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template itself refused the conversation (`raise_exception`).
    #[error("{0}")]
    Raised(String),
    #[error("chat template failed: {0}")]
    Render(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    source: String,
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate { env, bos_token, eos_token, source })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a list of `{role, content, ...}` objects). `extra` holds further
    /// variables (`tools`, `documents`, `chat_template_kwargs` entries), which may not override
    /// `messages` or `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &impl Serialize,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TemplateError::Render(describe(&e)))?;
        let mut vars: std::collections::BTreeMap<String, Value> =
            extra.iter().map(|(k, v)| (k.clone(), Value::from_serialize(v))).collect();
        vars.insert("messages".into(), Value::from_serialize(messages));
        vars.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        vars.insert("bos_token".into(), Value::from(self.bos_token.clone().unwrap_or_default()));
        vars.insert("eos_token".into(), Value::from(self.eos_token.clone().unwrap_or_default()));
        template.render(vars).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
                TemplateError::Raised(e.detail().unwrap_or_default()[RAISED.len()..].to_string())
            }
            _ => TemplateError::Render(describe(&e)),
        })
    }
}

/// Marks errors that come from the template's own `raise_exception`.
const RAISED: &str = "raised: ";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Python's `json.dumps`, which transformers' `tojson` filter calls (`ensure_ascii=False` unless
/// the template asks otherwise; `indent`, `sort_keys` and `separators` as templates pass them).
/// minijinja's own `tojson` escapes HTML characters, which would change what the model sees.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
        // Python's defaults: no space after commas when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = JsonStyle {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonStyle {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).expect("strings serialize");
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn write(&self, value: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match value {
            J::Array(items) if items.is_empty() => out.push_str("[]"),
            J::Object(map) if map.is_empty() => out.push_str("{}"),
            J::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(map) => {
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            J::String(s) => self.string(s, out),
            other => out.push_str(&other.to_string()),
        }
    }
}

/// `strftime_now(format)`, which Llama 3.1+ templates call for "Today Date". Supports the
/// directives templates use; the time is UTC.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(Value::from(format_utc(secs as i64, &format)?))
}

fn format_utc(unix_secs: i64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = unix_secs.div_euclid(86400);
    let secs_of_day = unix_secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    let month_name = MONTHS[(month - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(source.into(), Some("<s>".into()), Some("</s>".into()))?;
        t.render(&messages, true, &serde_json::Map::new())
    }

    #[test]
    fn python_methods_and_block_trimming_work_like_transformers() {
        let source = "{% for m in messages %}\n  {{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}";
        let out = render(source, json!([{"role": "user", "content": "  hi  "}])).unwrap();
        assert_eq!(out, "  USER: hi\nA:");
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let source =
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let err = render(source, json!([{"role": "assistant", "content": "x"}])).err().unwrap();
        assert_eq!(err, TemplateError::Raised("Conversation roles must alternate".into()));
        assert!(matches!(ChatTemplate::new("{% if %}".into(), None, None), Err(TemplateError::Syntax(_))));
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let out = render("{{ messages[0] | tojson }}", json!([{"a": [1, "é<"], "b": {"c": null}}])).unwrap();
        assert_eq!(out, r#"{"a": [1, "é<"], "b": {"c": null}}"#);
        let out = render("{{ messages[0] | tojson(indent=2) }}", json!([{"a": 1, "b": [2, 3]}])).unwrap();
        assert_eq!(out, "{\n  \"a\": 1,\n  \"b\": [\n    2,\n    3\n  ]\n}");
        // Keys keep the order the client sent them in, unless sorted.
        let out = render("{{ messages[0] | tojson }}", json!([{"z": 1, "a": 2}])).unwrap();
        assert_eq!(out, r#"{"z": 1, "a": 2}"#);
        let out =
            render("{{ messages[0] | tojson(sort_keys=true, separators=[',', ':']) }}", json!([{"z": 1, "a": "é"}]))
                .unwrap();
        assert_eq!(out, r#"{"a":"é","z":1}"#);
        let out = render("{{ messages[0] | tojson(ensure_ascii=true) }}", json!([{"a": "é🚀"}])).unwrap();
        assert_eq!(out, r#"{"a": "\u00e9\ud83d\ude80"}"#);
    }

    #[test]
    fn strftime_formats_civil_dates() {
        // 2024-07-23 14:05:09 UTC was a Tuesday.
        assert_eq!(format_utc(1721743509, "%d %b %Y %H:%M:%S %A").unwrap(), "23 Jul 2024 14:05:09 Tuesday");
        assert_eq!(format_utc(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
    }
}
