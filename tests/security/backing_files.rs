//! Backing files named by a hostile image (issue 12, first finding): a qcow2 whose
//! header names `../outside/secret.raw` or an absolute path used to be followed by
//! `blockdev-add` and the config, so the guest read that host file through the
//! image's unallocated clusters; a FIFO as backing file blocked the opening thread.
//!
//! Now the block graph (what `cryptvm run` and QMP use) follows a backing file named
//! by an image only if it is a regular file inside the image's own folder tree; a
//! backing node named in the options is always used; `cryptvm img` keeps qemu-img's
//! behaviour and warns about absolute names.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use block::blockdev::{BackingFiles, OpenContext};
use block::{BlockGraph, ErrorKind, SecretStore};
use common::*;
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

/// `vm/` holds the images; `outside/secret.raw` is a host file the guest must not read.
fn scratch(tag: &str) -> Scratch {
    let s = Scratch::new(tag);
    std::fs::create_dir(s.join("vm")).expect("mkdir vm");
    std::fs::create_dir(s.join("outside")).expect("mkdir outside");
    s.write("outside/secret.raw", &vec![0x5e; MIB]);
    s
}

/// Creates `vm/NAME` with qemu-img, backed by `backing` (as qemu-img records it).
fn qcow2_backed_by(s: &Scratch, name: &str, backing: &str) {
    run(
        "qemu-img",
        [
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", name, "1M",
        ],
        Some(&s.join("vm")),
    )
    .ok();
}

/// Opens `vm/NAME` through the block graph as `blockdev-add` does, with `extra`
/// merged into the qcow2 node's options, and reads its first MiB.
fn open_and_read(root: &Path, name: &str, extra: Value) -> block::Result<Vec<u8>> {
    let secrets = SecretStore::new();
    let ctx = OpenContext {
        secrets: &secrets,
        base_dir: None,
        no_io: false,
        read_only: true,
        backing_files: BackingFiles::default(),
        legacy_aes: false,
    };
    let mut args = json!({
        "node-name": "disk",
        "driver": "qcow2",
        "file": {"driver": "file", "filename": root.join("vm").join(name)},
    });
    for (k, v) in extra.as_object().expect("an object") {
        args[k] = v.clone();
    }
    let mut graph = BlockGraph::new();
    graph.add("blockdevs[0]", args, &ctx, false)?;
    let node = graph.get("disk").expect("the node just added");
    let mut buf = vec![0u8; MIB];
    node.read_at(0, &mut buf)?;
    Ok(buf)
}

#[track_caller]
fn assert_refused(result: block::Result<Vec<u8>>, mentions: &[&str]) {
    match result {
        Ok(data) => panic!(
            "the image's backing file was followed (first byte {:#x})",
            data[0]
        ),
        Err(e) => {
            let msg = e.to_string();
            for m in mentions {
                assert!(msg.contains(m), "the error does not mention '{m}': {msg}");
            }
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{msg}");
        }
    }
}

#[test]
fn the_graph_is_contained_by_default() {
    assert_eq!(BackingFiles::default(), BackingFiles::Contained);
}

#[test]
fn a_relative_name_leaving_the_folder_is_refused() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-rel");
    qcow2_backed_by(&s, "top.qcow2", "../outside/secret.raw");
    assert_refused(
        open_and_read(s.path(), "top.qcow2", json!({})),
        &["secret.raw", "outside the image's folder", "\"backing\""],
    );
}

#[test]
fn an_absolute_name_is_refused() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-abs");
    let secret = s.join("outside/secret.raw");
    qcow2_backed_by(&s, "top.qcow2", &secret.display().to_string());
    assert_refused(
        open_and_read(s.path(), "top.qcow2", json!({})),
        &["secret.raw", "outside the image's folder"],
    );
}

#[test]
fn a_symlink_inside_the_folder_pointing_out_is_refused() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-link");
    std::os::unix::fs::symlink("../outside/secret.raw", s.join("vm/base.raw")).expect("symlink");
    qcow2_backed_by(&s, "top.qcow2", "base.raw");
    assert_refused(
        open_and_read(s.path(), "top.qcow2", json!({})),
        &["base.raw", "outside the image's folder"],
    );
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-fifo");
    let fifo = s.join("vm/base.raw");
    let c = std::ffi::CString::new(fifo.display().to_string()).expect("no NUL");
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    qcow2_backed_by(&s, "top.qcow2", "base.raw");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = s.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(open_and_read(&path, "top.qcow2", json!({})).map(|_| ()));
    });
    let start = Instant::now();
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("opening an image backed by a FIFO blocked");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_refused(
        result.map(|()| vec![0]),
        &["base.raw", "not a regular file"],
    );
}

#[test]
fn a_regular_file_in_the_folder_tree_is_followed() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-inside");
    std::fs::create_dir(s.join("vm/bases")).expect("mkdir");
    s.write("vm/bases/base.raw", &vec![0x42; MIB]);
    qcow2_backed_by(&s, "top.qcow2", "bases/base.raw");
    let data = open_and_read(s.path(), "top.qcow2", json!({})).expect("a contained backing file");
    assert!(data.iter().all(|&b| b == 0x42), "the backing file's data");
}

#[test]
fn a_backing_node_named_in_the_options_is_used() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-named");
    qcow2_backed_by(&s, "top.qcow2", "../outside/secret.raw");
    let secret = s.join("outside/secret.raw");
    let data = open_and_read(
        s.path(),
        "top.qcow2",
        json!({"backing": {"driver": "raw", "file": {"driver": "file", "filename": secret}}}),
    )
    .expect("the backing node the user named");
    assert!(
        data.iter().all(|&b| b == 0x5e),
        "the named backing node's data"
    );
    let none = open_and_read(s.path(), "top.qcow2", json!({"backing": null})).expect("no backing");
    assert!(none.iter().all(|&b| b == 0), "backing: null reads zeros");
}

#[test]
fn img_follows_like_qemu_img_and_warns_about_absolute_names() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = scratch("backing-img");
    let secret = s.join("outside/secret.raw");
    qcow2_backed_by(&s, "abs.qcow2", &secret.display().to_string());
    qcow2_backed_by(&s, "rel.qcow2", "../outside/secret.raw");
    let vm = s.join("vm");
    for (name, warns) in [("abs.qcow2", true), ("rel.qcow2", false)] {
        let out = format!("{name}.raw");
        let r = cryptvm(&vm, ["img", "convert", "-O", "raw", name, &out]).ok();
        assert_eq!(
            r.stderr
                .contains("warning: following the absolute backing file name"),
            warns,
            "{r}"
        );
        let got = read(&vm.join(&out));
        assert!(
            got.iter().all(|&b| b == 0x5e),
            "{name}: the backing file's data"
        );
    }
}
