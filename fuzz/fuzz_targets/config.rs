//! The VM configuration: a JSON config document (`VmConfig::apply_json`), the
//! command-line options, `--object`/`--blockdev`/`--device` with their key=value
//! syntax (`block/src/keyval.rs`), then `VmConfig::cold_plug()`, which checks and
//! types the objects, block nodes and devices and opens nothing.
//!
//! Input: UTF-8 text. Lines starting with `--NAME=` are options (`--config` is
//! skipped: it names a file); the other lines, joined, are the JSON document.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmm::config::VmConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut options = Vec::new();
    let mut json = String::new();
    for line in text.lines() {
        match line.strip_prefix("--").and_then(|l| l.split_once('=')) {
            Some((name, value)) => options.push((name, value)),
            None => {
                json.push_str(line);
                json.push('\n');
            }
        }
    }
    let mut config = VmConfig::default();
    if !json.trim().is_empty() {
        let Ok(value) = serde_json::from_str(&json) else {
            return;
        };
        if config
            .apply_json(&value, Some(Path::new("/nonexistent/fuzz")))
            .is_err()
        {
            return;
        }
    }
    for (name, value) in options {
        if name == "config" {
            continue;
        }
        if config.apply_option(name, value).is_err() {
            return;
        }
    }
    let _ = config.cmdline();
    if let Ok(plan) = config.cold_plug() {
        for action in plan.actions() {
            let _ = action.command();
        }
    }
});
