//! Command-line checks the binaries share, so a new user's first mistake gets an answer that
//! says what to do.

use std::path::Path;

/// Checks that the model folder given by `--model` (or `env`) exists, before anything loads
/// it. A relative path is resolved against the working directory, which is what a user who
/// starts a binary from another folder gets wrong; the error names both forms and the fix.
pub fn check_model_dir(dir: &Path, env: &str) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let what = if dir.exists() { "is not a folder" } else { "does not exist" };
    let relative = if dir.is_relative() {
        " (a relative --model is resolved against the working directory; run from the \
         repository root or give an absolute path)"
    } else {
        ""
    };
    anyhow::bail!(
        "model folder {} {what}: looked for {}{relative}; point --model (or {env}) at a folder \
         with config.json, model.safetensors and the tokenizer files",
        dir.display(),
        absolute.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_relative_model_names_the_absolute_path_and_the_fix() {
        let err = check_model_dir(Path::new("no/such/model"), "LLORCH_MODEL").unwrap_err();
        let msg = err.to_string();
        let cwd = std::env::current_dir().unwrap();
        assert!(msg.contains(&cwd.join("no/such/model").display().to_string()), "{msg}");
        assert!(msg.contains("does not exist") && msg.contains("--model"), "{msg}");
        assert!(msg.contains("LLORCH_MODEL") && msg.contains("working directory"), "{msg}");
    }

    #[test]
    fn a_file_is_not_a_model_folder_and_a_folder_is() {
        let file = std::env::current_exe().unwrap();
        let msg = check_model_dir(&file, "LLORCH_MODEL").unwrap_err().to_string();
        assert!(msg.contains("is not a folder") && !msg.contains("working directory"), "{msg}");
        check_model_dir(file.parent().unwrap(), "LLORCH_MODEL").unwrap();
    }
}
