//! `cryptvm img check`: qcow2 metadata consistency, reported (and repaired)
//! as `qemu-img check` does.

use block::qcow2::{check, CheckReport, Repair};
use serde_json::json;

use block::info::display_name;

use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

/// Runs `img check`: exit 0 clean, 2 corruptions, 3 leaks only, as qemu-img.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qU", "frT")?;
    let [spec] = a.positional.as_slice() else {
        return Err(ImgError::Msg("Expecting one image file name".into()));
    };
    let repair = match a
        .short
        .iter()
        .find(|(c, _)| *c == 'r')
        .map(|(_, v)| v.as_str())
    {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => {
            return Err(ImgError::Msg(format!(
                "Invalid -r option: '{other}' (leaks or all)"
            )))
        }
    };
    let secrets = load_objects(&a.objects)?;
    let mut opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let format = opts
        .get("driver")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    if format != "qcow2" {
        // As qemu-img: the image is opened first (a wrong passphrase, a missing file
        // are reported as such), then this message, exit status 63 (ENOTSUP).
        open(
            opts,
            &secrets,
            OpenMode {
                read_only: true,
                no_io: false,
                cache: a.src_cache,
            },
        )
        .map_err(|e| e.opening(spec))?;
        super::error_line("This image format does not support checks");
        return Ok(63);
    }
    // Check the qcow2 file itself, not the opened node: the checker reads
    // (and repairs) metadata that opening would refuse or change.
    let file_opts = opts
        .remove("file")
        .ok_or_else(|| ImgError::Msg("qcow2 image has no 'file'".into()))?;
    let mut file_map = file_opts
        .as_object()
        .cloned()
        .ok_or_else(|| ImgError::Msg("'file' must be an object".into()))?;
    // As in QEMU, where a format node's file child passes discards down by
    // default: clusters a repair frees are punched out of the file.
    file_map.entry("discard").or_insert_with(|| json!("unmap"));
    let file = open(
        file_map,
        &secrets,
        OpenMode {
            read_only: repair == Repair::None,
            no_io: false,
            cache: a.src_cache,
        },
    )
    .map_err(|e| e.opening(spec))?;
    // As qemu-img: the driver's messages go to stderr whatever the output
    // format; after a repair the image is checked again, and that second
    // check is what the summary shows (with the first one's repair counts).
    let first = check(file.node.clone(), repair)?;
    print_messages(&first);
    if first.failed {
        super::error_line("Check failed: Input/output error");
        return Ok(1);
    }
    let report = if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
        if !a.json && !a.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                first.leaks_fixed, first.corruptions_fixed
            );
        }
        let again = check(file.node.clone(), Repair::None)?;
        print_messages(&again);
        if again.failed {
            super::error_line("Check failed: Input/output error");
            return Ok(1);
        }
        CheckReport {
            leaks_fixed: first.leaks_fixed,
            corruptions_fixed: first.corruptions_fixed,
            ..again
        }
    } else {
        first
    };
    let name = display_name(&file.node);
    if a.json {
        let mut m = serde_json::Map::new();
        m.insert("image-end-offset".into(), json!(report.image_end_offset));
        m.insert("total-clusters".into(), json!(report.total_clusters));
        if report.allocated_clusters > 0 {
            m.insert(
                "allocated-clusters".into(),
                json!(report.allocated_clusters),
            );
            m.insert(
                "fragmented-clusters".into(),
                json!(report.fragmented_clusters),
            );
            m.insert(
                "compressed-clusters".into(),
                json!(report.compressed_clusters),
            );
        }
        m.insert("check-errors".into(), json!(report.check_errors));
        if report.corruptions > 0 {
            m.insert("corruptions".into(), json!(report.corruptions));
        }
        if report.leaks > 0 {
            m.insert("leaks".into(), json!(report.leaks));
        }
        if report.corruptions_fixed > 0 {
            m.insert("corruptions-fixed".into(), json!(report.corruptions_fixed));
        }
        if report.leaks_fixed > 0 {
            m.insert("leaks-fixed".into(), json!(report.leaks_fixed));
        }
        m.insert("filename".into(), json!(name));
        m.insert("format".into(), json!("qcow2"));
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Object(m)).expect("JSON")
        );
    } else if !a.quiet {
        print!("{}", human_report(&report));
    }
    if report.check_errors > 0 {
        super::error_line("Check failed");
    }
    Ok(exit_status(&report))
}

/// The driver's messages, on stderr (as QEMU's `fprintf(stderr, ...)`).
fn print_messages(r: &CheckReport) {
    for line in &r.messages {
        eprintln!("{line}");
    }
}

/// qemu-img check's exit status: 2 corruptions left, 3 leaks left, 0 clean.
fn exit_status(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// The summary qemu-img check prints on stdout.
fn human_report(r: &CheckReport) -> String {
    let mut out = String::new();
    let (corrupt, leaks) = (r.corruptions, r.leaks);
    if corrupt == 0 && leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if corrupt > 0 {
            out += &format!(
                "\n{corrupt} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            );
        }
        if leaks > 0 {
            out += &format!(
                "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            );
        }
        if r.check_errors > 0 {
            out += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        out += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        );
    }
    if r.image_end_offset > 0 {
        out += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    out
}
