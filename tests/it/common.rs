//! Fixture access and small builders shared by the integration tests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pagoda::engine::{Engine, EngineRequest, MaxTokens, RequestId, RequestOutput, SamplingParams};
use pagoda::launch::{EngineOptions, load_engine};
use serde_json::Value;

/// `../shared/fixtures`. The fixtures are part of the project's CI checkout; without them these
/// tests cannot say anything, so they fail loudly rather than pass.
pub fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    assert!(
        dir.join("tiny-llama/config.json").is_file(),
        "the model fixtures are missing: expected ../shared/fixtures beside the repository ({})",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

pub const MODELS: [&str; 2] = ["tiny-llama", "tiny-llama-bf16"];

pub struct PromptRef {
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub steps: Vec<StepRef>,
}

pub struct StepRef {
    pub token: u32,
    pub logprob: f32,
    pub top5: Vec<(u32, f32)>,
    pub margin: f32,
}

pub struct ChatRef {
    pub messages: Value,
    pub rendered: String,
    pub ids: Vec<u32>,
}

pub struct Reference {
    pub prompts: Vec<PromptRef>,
    pub chats: Vec<ChatRef>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn reference(model: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PromptRef {
            text: p["text"].as_str().unwrap().to_string(),
            prompt_ids: ids(&p["prompt_ids"]),
            greedy_ids: ids(&p["greedy_ids"]),
            steps: p["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| StepRef {
                    token: s["token"].as_u64().unwrap() as u32,
                    logprob: s["logprob"].as_f64().unwrap() as f32,
                    top5: s["top5"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| (t[0].as_u64().unwrap() as u32, t[1].as_f64().unwrap() as f32))
                        .collect(),
                    margin: s["margin"].as_f64().unwrap() as f32,
                })
                .collect(),
        })
        .collect();
    let chats = v["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ChatRef {
            messages: c["messages"].clone(),
            rendered: c["rendered"].as_str().unwrap().to_string(),
            ids: ids(&c["ids"]),
        })
        .collect();
    Reference { prompts, chats }
}

/// An engine over a fixture model with test-sized defaults, adjusted by `tweak`.
pub fn engine(model: &str, tweak: impl FnOnce(&mut EngineOptions)) -> Engine {
    let mut opts =
        EngineOptions { model: Some(fixture(model)), num_gpu_blocks_override: Some(256), ..EngineOptions::default() };
    tweak(&mut opts);
    load_engine(&opts).unwrap().engine
}

pub fn request(id: &str, prompt: Vec<u32>, params: SamplingParams) -> EngineRequest {
    EngineRequest { id: RequestId(id.to_string()), prompt_token_ids: prompt, params, arrival: Instant::now() }
}

/// Greedy, EOS ignored, `max_tokens` tokens.
pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens: MaxTokens::Exact(max_tokens), ignore_eos: true, ..SamplingParams::greedy() }
}

/// Checks the requests, runs them together and returns completions in request-id order.
pub fn run(engine: &mut Engine, requests: Vec<pagoda::engine::EngineRequest>) -> Vec<RequestOutput> {
    for r in requests {
        let r = r.validate(&engine.limits()).unwrap();
        engine.add_request(r).unwrap();
    }
    engine.run_to_completion().unwrap()
}

/// A scratch folder under the target directory, emptied first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a fixture model (model files only) into a fresh scratch folder.
pub fn copy_fixture(model: &str, name: &str) -> PathBuf {
    let dir = scratch_dir(name);
    for entry in std::fs::read_dir(fixture(model)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if !file.starts_with("reference") {
            let dst = dir.join(&file);
            std::fs::copy(&path, &dst).unwrap();
            // The fixtures are read-only; the copies are for tests to break.
            let mut perms = std::fs::metadata(&dst).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&dst, perms).unwrap();
        }
    }
    dir
}

/// Reports that a test cannot run because a tool is absent. Under `./test.sh` (and so in CI),
/// which installs every tool and sets `PAGODA_REQUIRE_TOOLS=1`, that is a failure, never a pass.
pub fn tool_missing(why: &str) {
    if std::env::var("PAGODA_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("{why}, and PAGODA_REQUIRE_TOOLS=1 says every tool must be installed");
    }
    println!("did not run: {why}");
}
