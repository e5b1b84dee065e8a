//! `cryptvm img info`: what `qemu-img info` shows, in text or JSON.

use std::collections::HashSet;

use serde_json::{json, Value};

use block::info::node_info;
use block::SecretStore;

use super::image::{image_options, load_objects, open, OpenMode};
use super::qjson::to_pretty;
use super::size::human;
use super::{Args, ImgError, Result};

/// Runs `img info`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qU", "ft")?;
    let [spec] = a.positional.as_slice() else {
        return Err(ImgError::Msg("Expecting one image file name".into()));
    };
    let secrets = load_objects(&a.objects)?;
    let list = collect_infos(&a, spec, &secrets)?;
    if a.json {
        let value = match (a.backing_chain, list.as_slice()) {
            (false, [info]) => info.clone(),
            _ => Value::Array(list),
        };
        println!("{}", to_pretty(&value));
    } else {
        let texts: Vec<String> = list.iter().map(|info| human_info(info, 0)).collect();
        print!("{}", texts.join("\n"));
    }
    Ok(0)
}

/// The info of the image named `spec` and, with `--backing-chain`, of each
/// image below it (qemu-img's `collect_image_info_list`): each opened on its
/// own, by its full backing file name and the format its parent names.
fn collect_infos(a: &Args, spec: &str, secrets: &SecretStore) -> Result<Vec<Value>> {
    let mut list = Vec::new();
    let mut seen = HashSet::new();
    let mut name = spec.to_string();
    let mut format = a.format.clone();
    let mut image_opts = a.image_opts;
    loop {
        if !seen.insert(name.clone()) {
            return Err(ImgError::Msg(format!(
                "Backing file '{name}' creates an infinite loop."
            )));
        }
        let opts = image_options(&name, image_opts, format.as_deref())?;
        let mode = OpenMode {
            read_only: true,
            no_io: true,
            cache: a.cache,
        };
        let image = open(opts, secrets, mode).map_err(|e| e.opening(&name))?;
        let info = node_info(&image.node);
        let next = backing_name(&info)?;
        format = info
            .get("backing-filename-format")
            .and_then(Value::as_str)
            .map(str::to_string);
        list.push(info);
        match next {
            Some(n) if a.backing_chain => name = n,
            _ => return Ok(list),
        }
        image_opts = false;
    }
}

/// The full name of the backing file an info names, if any.
fn backing_name(info: &Value) -> Result<Option<String>> {
    let get = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_string);
    match (get("full-backing-filename"), get("backing-filename")) {
        (Some(full), _) => Ok(Some(full)),
        (None, Some(b)) => Err(ImgError::Msg(format!(
            "Could not determine absolute backing filename, but backing filename '{b}' present"
        ))),
        (None, None) => Ok(None),
    }
}

/// The text form, indented by `level` * 4 spaces.
fn human_info(info: &Value, level: usize) -> String {
    let pad = " ".repeat(level * 4);
    let mut out = String::new();
    let get_u64 = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
    let filename = info["filename"].as_str().unwrap_or_default();
    let format = info["format"].as_str().unwrap_or_default();
    if format == "file" {
        out += &format!("{pad}filename: {filename}\n{pad}protocol type: file\n");
        out += &format!(
            "{pad}file length: {} ({} bytes)\n",
            human(get_u64("virtual-size")),
            get_u64("virtual-size")
        );
        if let Some(a) = info.get("actual-size").and_then(Value::as_u64) {
            out += &format!("{pad}disk size: {}\n", human(a));
        }
    } else {
        out += &format!("{pad}image: {filename}\n{pad}file format: {format}\n");
        out += &format!(
            "{pad}virtual size: {} ({} bytes)\n",
            human(get_u64("virtual-size")),
            get_u64("virtual-size")
        );
        if let Some(a) = info.get("actual-size").and_then(Value::as_u64) {
            out += &format!("{pad}disk size: {}\n", human(a));
        }
        if info.get("encrypted") == Some(&json!(true)) {
            out += &format!("{pad}encrypted: yes\n");
        }
        if let Some(c) = info.get("cluster-size").and_then(Value::as_u64) {
            out += &format!("{pad}cluster_size: {c}\n");
        }
        if let Some(b) = info.get("backing-filename").and_then(Value::as_str) {
            let full = info
                .get("full-backing-filename")
                .and_then(Value::as_str)
                .unwrap_or(b);
            if full == b {
                out += &format!("{pad}backing file: {b}\n");
            } else {
                out += &format!("{pad}backing file: {b} (actual path: {full})\n");
            }
        }
        if let Some(f) = info.get("backing-filename-format").and_then(Value::as_str) {
            out += &format!("{pad}backing file format: {f}\n");
        }
        if info.get("dirty-flag") == Some(&json!(true)) {
            out += &format!("{pad}cleanly shut down: no\n");
        }
        out += &snapshot_table(info, &pad);
        if let Some(data) = info.get("format-specific").and_then(|s| s.get("data")) {
            out += &format!("{pad}Format specific information:\n");
            dump(data, level + 1, &mut out);
        }
    }
    for child in info["children"].as_array().into_iter().flatten() {
        let name = child["name"].as_str().unwrap_or_default();
        out += &format!("{pad}Child node '/{name}':\n");
        out += &human_info(&child["info"], level + 1);
    }
    out
}

/// The "Snapshot list:" section of `info` (and `img snapshot -l`), each
/// line prefixed by `pad`; empty when `info` has no snapshots.
pub(crate) fn snapshot_table(info: &Value, pad: &str) -> String {
    let mut out = String::new();
    if let Some(snaps) = info.get("snapshots").and_then(Value::as_array) {
        out += &format!("{pad}Snapshot list:\n");
        out += &format!(
            "{pad}{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for sn in snaps {
            out += &format!("{pad}{}\n", snapshot_line(sn));
        }
    }
    out
}

/// One row of qemu-img's snapshot table (dates in UTC).
fn snapshot_line(sn: &Value) -> String {
    let n = |k: &str| sn.get(k).and_then(Value::as_u64).unwrap_or(0);
    let secs = n("vm-clock-sec");
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        n("vm-clock-nsec") / 1_000_000
    );
    let icount = sn
        .get("icount")
        .and_then(Value::as_u64)
        .map(|i| i.to_string())
        .unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.get("id").and_then(Value::as_str).unwrap_or_default(),
        sn.get("name").and_then(Value::as_str).unwrap_or_default(),
        human(n("vm-state-size")),
        utc_date(n("date-sec")),
        clock,
        icount
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
fn utc_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// QEMU's `dump_qobject`: keys with spaces for dashes, lists as `[i]:`.
fn dump(value: &Value, level: usize, out: &mut String) {
    let pad = " ".repeat(level * 4);
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = k.replace('-', " ");
                if v.is_object() || v.is_array() {
                    out.push_str(&format!("{pad}{key}:\n"));
                    dump(v, level + 1, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]:\n"));
                dump(v, level + 1, out);
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_795_648_297), "2026-11-25 23:11:37");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
    }
}
