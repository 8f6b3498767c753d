//! Records the git commit the binary is built from, for `/version`, `pagoda_build_info` and
//! `pagoda info`. Builds outside a git checkout (Nix, crates tarballs) pass `PAGODA_GIT_COMMIT`.

fn main() {
    println!("cargo:rerun-if-env-changed=PAGODA_GIT_COMMIT");
    let commit = std::env::var("PAGODA_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    if std::path::Path::new(".git/HEAD").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
    }
    println!("cargo:rustc-env=PAGODA_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".to_string()));
}
