//! `llorch-engine generate` from the command line: every sampling flag reaches the request
//! (the greedy cases of `fixtures/reference/sampling/cases.json`, Hugging Face `generate` on
//! the tiny model, run through the flags), and bad values are refused with the flag named.

use std::process::Command;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate(prompt: &str, args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llorch-engine"))
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .args(["generate", "--model", "fixtures/models/tiny", "--prompt-ids", prompt])
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_flags_give_hugging_faces_greedy_ids_for_each_sampling_case() {
    let text =
        std::fs::read_to_string(root().join("fixtures/reference/sampling/cases.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut ran = Vec::new();
    for case in cases["greedy"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let join = |v: &serde_json::Value| {
            v.as_array().unwrap().iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        };
        let mut args: Vec<String> = vec![
            "--temperature".into(),
            "0".into(),
            "--max-new-tokens".into(),
            case["max_new_tokens"].to_string(),
        ];
        if !case["stop_token_ids"].as_array().unwrap().is_empty() {
            args.extend(["--stop-token-ids".into(), join(&case["stop_token_ids"])]);
        }
        if case["ignore_eos"].as_bool().unwrap() {
            args.push("--ignore-eos".into());
        }
        for (param, value) in case["params"].as_object().unwrap() {
            match param.as_str() {
                "logit_bias" => {
                    for (id, bias) in value.as_object().unwrap() {
                        args.extend(["--logit-bias".into(), format!("{id}={bias}")]);
                    }
                }
                p => args.extend([format!("--{}", p.replace('_', "-")), value.to_string()]),
            }
        }
        let out = generate(&join(&case["prompt_ids"]), &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["generated_ids"], case["ids"], "{name}: {args:?}");
        assert_eq!(got["finish_reason"], case["finish"], "{name}");
        ran.push(name.to_owned());
    }
    for needed in ["logit_bias", "presence_frequency", "negative_presence_frequency"] {
        assert!(ran.iter().any(|n| n == needed), "{needed} not in {ran:?}");
    }
}

#[test]
fn bad_sampling_flags_name_themselves() {
    for (args, says, code) in [
        (&["--logit-bias", "5"][..], "ID=BIAS", 2),
        (&["--logit-bias", "x=1"][..], "token id", 2),
        (&["--logit-bias", "5=1000"][..], "logit_bias", 1),
        (&["--logit-bias", "60000=1"][..], "vocab_size 50257", 1),
        (&["--presence-penalty", "3"][..], "presence_penalty", 1),
        (&["--frequency-penalty", "-3"][..], "frequency_penalty", 1),
    ] {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let out = generate("15496,13", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
