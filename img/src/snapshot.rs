//! `cryptvm img snapshot`: lists, creates, applies and deletes the internal
//! snapshots of a qcow2 image as `qemu-img snapshot` does, with its
//! messages and exit status.

use std::time::{SystemTime, UNIX_EPOCH};

use block::snapshot::SnapshotError;
use block::{BlockError, NodeRef};
use serde_json::{json, Value};

use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

/// What `img snapshot` is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// `-l` (also the default).
    List,
    /// `-a NAME`.
    Apply(String),
    /// `-c NAME`.
    Create(String),
    /// `-d NAME`.
    Delete(String),
}

/// qemu-img's usage error: the message, a hint, status 1.
fn usage_error(msg: &str) -> u8 {
    super::error_line(msg);
    eprintln!("Try '{} snapshot --help' for more info", super::invoked());
    1
}

/// The action the options name; `Err` with qemu-img's message when they
/// name more than one.
fn action_of(a: &Args) -> std::result::Result<Action, &'static str> {
    let mut found = Vec::new();
    for _ in a.short_flags.iter().filter(|&&c| c == 'l') {
        found.push(Action::List);
    }
    for (c, v) in &a.short {
        match c {
            'a' => found.push(Action::Apply(v.clone())),
            'c' => found.push(Action::Create(v.clone())),
            'd' => found.push(Action::Delete(v.clone())),
            _ => {}
        }
    }
    match found.len() {
        0 => Ok(Action::List),
        1 => Ok(found.remove(0)),
        _ => Err("Cannot mix '-l', '-a', '-c', '-d'"),
    }
}

/// Runs `img snapshot [options] FILENAME`; 0 on success, 1 otherwise.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "lqU", "facd")?;
    let action = match action_of(&a) {
        Ok(act) => act,
        Err(msg) => return Ok(usage_error(msg)),
    };
    let [spec] = a.positional.as_slice() else {
        return Ok(usage_error("Expecting one image file name"));
    };
    let read_only = action == Action::List;
    if a.short_flags.contains(&'U') && !read_only {
        return Err(
            ImgError::Msg("force-share=on can only be used with read-only images".into())
                .opening(spec),
        );
    }
    let secrets = load_objects(&a.objects)?;
    let probed = a.format.is_none() && !a.image_opts && !spec.starts_with("json:");
    let opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let image = open(
        opts,
        &secrets,
        OpenMode {
            read_only,
            no_io: false,
            cache: None,
        },
    )
    .map_err(|e| e.opening(spec))?;
    let node = &image.node;
    if probed && !read_only && node.driver() == "raw" {
        eprintln!("{}", super::resize::probed_raw_warning(spec));
    }
    match action {
        Action::List => {
            print!("{}", list_text(node));
            Ok(0)
        }
        Action::Create(name) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            // As QEMU: the time in microseconds.
            let nsec = now.subsec_micros() * 1000;
            node.snapshot_create(&name, now.as_secs() as u32, nsec)
                .and_then(|()| node.flush())
                .map_err(|e| {
                    ImgError::Msg(format!(
                        "Could not create snapshot '{name}': {}",
                        errno_text(&e)
                    ))
                })?;
            Ok(0)
        }
        Action::Apply(name) => {
            node.snapshot_goto(&name)
                .and_then(|()| node.flush())
                .map_err(|e| {
                    let why = match &e {
                        BlockError::Snapshot(SnapshotError::NotSupported) => {
                            "Block driver does not support snapshots".to_string()
                        }
                        BlockError::Snapshot(SnapshotError::BadL1(_)) => e.to_string(),
                        other => format!("Failed to load snapshot: {}", errno_text(other)),
                    };
                    ImgError::Msg(format!("Could not apply snapshot '{name}': {why}"))
                })?;
            Ok(0)
        }
        Action::Delete(name) => {
            // As qemu-img: the first snapshot of that name (IDs do not count).
            let found = node
                .snapshot_list()
                .ok()
                .and_then(|l| l.into_iter().find(|s| s.name == name));
            let Some(sn) = found else {
                return Err(ImgError::Msg(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                )));
            };
            node.snapshot_delete(&sn.id, &sn.name)
                .and_then(|()| node.flush())
                .map_err(|e| {
                    let why = match &e {
                        BlockError::Snapshot(SnapshotError::NotFound) => {
                            "Can't find the snapshot".to_string()
                        }
                        other => other.to_string(),
                    };
                    ImgError::Msg(format!("Could not delete snapshot '{name}': {why}"))
                })?;
            Ok(0)
        }
    }
}

/// An error as QEMU's `strerror(-ret)` words it, where it has an errno.
fn errno_text(e: &BlockError) -> String {
    match e {
        BlockError::Snapshot(s) => s.to_string(),
        BlockError::NotSupported(_) => "Operation not supported".into(),
        BlockError::ReadOnly(_) => "Permission denied".into(),
        other => match other.errno() {
            Some(n) => super::image::strerror(&std::io::Error::from_raw_os_error(n)),
            None => other.to_string(),
        },
    }
}

/// qemu-img's `dump_snapshots`: nothing when there are none (or the driver
/// keeps none), else the table `qemu-img info` shows.
fn list_text(node: &NodeRef) -> String {
    let list = match node.snapshot_list() {
        Ok(l) if !l.is_empty() => l,
        _ => return String::new(),
    };
    let rows: Vec<Value> = list.iter().map(|s| s.to_json()).collect();
    let info = json!({ "snapshots": rows });
    super::info::snapshot_table(&info, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Args::parse(&v, "lqU", "facd").unwrap()
    }

    #[test]
    fn actions() {
        assert_eq!(action_of(&args(&["x"])), Ok(Action::List));
        assert_eq!(
            action_of(&args(&["-c", "s", "x"])),
            Ok(Action::Create("s".into()))
        );
        assert!(action_of(&args(&["-l", "-d", "s", "x"])).is_err());
        assert!(action_of(&args(&["-l", "-l", "x"])).is_err());
    }
}
