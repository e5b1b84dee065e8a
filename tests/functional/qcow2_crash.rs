//! Crash consistency of the qcow2 driver: a process writing to a qcow2 image
//! (allocating clusters, growing L2 and refcount structures) is killed with
//! SIGKILL at random moments; `qemu-img check` must then find no corruption
//! (leaked clusters are allowed: they waste space, not data), and the image
//! must still open and read.

#[path = "../common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run, CRYPTVM};

#[test]
fn killed_writers_leave_no_corruption() {
    if !require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: every few writes allocate L2 tables and refcount blocks.
    for (round, delay_ms) in [15u64, 40, 80, 120, 200, 300, 60, 25]
        .into_iter()
        .enumerate()
    {
        let image = dir.path().join(format!("crash{round}.qcow2"));
        let img = image.to_str().unwrap();
        let lazy = if round % 2 == 0 { "off" } else { "on" };
        run(
            "qemu-img",
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size=512,lazy_refcounts={lazy}"),
                img,
                "256M",
            ],
            None,
        )
        .ok();
        // Sparse allocating writes: 4 KiB every 36 KiB, from 4 threads.
        let mut child = Command::new(CRYPTVM)
            .args([
                "img", "bench", "-w", "-c", "10000000", "-d", "4", "-s", "4k", "-S", "36k", "-f",
                "qcow2", img,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the writer finished before it was killed ({:?})",
            started.elapsed()
        );
        let check = run("qemu-img", ["check", "-f", "qcow2", img], None);
        // 0: clean, 3: leaks only. 2 would be corruption.
        assert!(
            matches!(check.status, Some(0) | Some(3)),
            "round {round} (killed after {delay_ms} ms, lazy refcounts {lazy}): image corrupt\n{check}"
        );
        // And it opens and reads (a dirty lazy-refcounts image is repaired on open for writing).
        run(
            CRYPTVM,
            [
                "img",
                "convert",
                "-O",
                "raw",
                img,
                dir.path().join("out.raw").to_str().unwrap(),
            ],
            None,
        )
        .ok();
        run("qemu-img", ["check", "-r", "all", "-f", "qcow2", img], None);
    }
}
