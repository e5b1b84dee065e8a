//! The README followed from a fresh clone, without the slow parts: its "Build", "Try it"
//! and "Test" sections' commands name things that exist (scripts present and executable,
//! `cargo build --release` building the `cryptvm` binary where the README says, the guest
//! landing where it says, the packages being those `.ci/run` installs), the scripts'
//! `--help` answers, and every repository path the README and `docs/*.md` name resolves.
//! No build and no guest boot: a few seconds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (vmm/'s parent).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The text of the README's `## TITLE` section (up to the next `## ` heading).
fn section<'a>(readme: &'a str, title: &str) -> &'a str {
    let heading = format!("\n## {title}\n");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README.md has no \"## {title}\" section"))
        + heading.len();
    let end = readme[start..]
        .find("\n## ")
        .map_or(readme.len(), |n| start + n);
    &readme[start..end]
}

/// The contents of the fenced code blocks of `text`.
fn code_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(String::new()),
            }
        } else if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(current.is_none(), "an unterminated code block");
    blocks
}

/// The commands of a shell block: comments dropped, `\` continuations joined, `;`-split.
fn commands(block: &str) -> Vec<String> {
    let mut joined = String::new();
    for line in block.lines() {
        let line = line.split(" #").next().unwrap_or("");
        let line = if line.trim_start().starts_with('#') {
            ""
        } else {
            line
        };
        match line.strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
            }
            None => {
                joined.push_str(line);
                joined.push('\n');
            }
        }
    }
    joined
        .lines()
        .flat_map(|l| l.split(';'))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Words in backticks of `text`'s prose (fenced code blocks left out).
fn backticked(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

const SECTIONS: [&str; 3] = ["Build", "Try it", "Test"];

#[test]
fn build_section_comes_first_and_builds_the_release_binary() {
    let readme = read("README.md");
    let build_at = readme.find("\n## Build\n").expect("a Build section");
    let try_at = readme.find("\n## Try it\n").expect("a Try it section");
    assert!(build_at < try_at, "Build comes before Try it");
    let build = section(&readme, "Build");
    let cmds: Vec<String> = code_blocks(build)
        .iter()
        .flat_map(|b| commands(b))
        .collect();
    assert!(
        cmds.iter().any(|c| c == "cargo build --release"),
        "the Build section runs `cargo build --release`: {cmds:?}"
    );
    // Run at the root, it builds every workspace member, vmm's `cryptvm` binary among them.
    assert!(build.contains("target/release/cryptvm"), "names the binary");
    let workspace = read("Cargo.toml");
    let members = workspace
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    assert!(members.contains("\"vmm\""), "{members}");
    assert!(
        !workspace.contains("default-members"),
        "default-members would change what `cargo build --release` builds"
    );
    let vmm = read("vmm/Cargo.toml");
    assert!(
        vmm.contains("[[bin]]\nname = \"cryptvm\""),
        "vmm's binary is cryptvm"
    );
    // The Rust version is the workspace's rust-version.
    let version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("Cargo.toml has rust-version");
    assert!(
        build.contains(&format!("Rust {version} or newer")),
        "the Build section says Rust {version}"
    );
}

/// Debian package names in lines of `text` that install packages (`apt-get install`) or
/// list them (the README's comment lines under such a line).
fn packages(lines: &str) -> Vec<String> {
    lines
        .split_whitespace()
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
                && w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        })
        .filter(|w| {
            ![
                "apt-get",
                "install",
                "-y",
                "-o",
                "-t",
                "bookworm-backports",
                "tests",
                "only",
                "and",
                "from",
                "build",
                "guest",
                "nested",
                "test",
                "host",
                "no",
            ]
            .contains(w)
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_build_packages_are_those_ci_installs() {
    let readme = read("README.md");
    let blocks = code_blocks(section(&readme, "Build"));
    let apt = blocks
        .iter()
        .find(|b| b.contains("apt-get install"))
        .expect("the Build section lists Debian packages");
    let documented: Vec<String> = apt
        .lines()
        .map(|l| l.split(" # ").next().unwrap_or(""))
        .flat_map(packages)
        .collect();
    let ci = read(".ci/run");
    // .ci/run's install lines, continuations joined.
    let ci_lines: String = ci.replace("\\\n", " ");
    let installed: Vec<String> = ci_lines
        .lines()
        .filter(|l| l.trim_start().starts_with("apt-get install"))
        .flat_map(|l| packages(l.replace("Dpkg::Options::=--force-confold", "").as_str()))
        .collect();
    assert!(!installed.is_empty(), ".ci/run installs packages");
    for p in &installed {
        assert!(
            documented.contains(p),
            ".ci/run installs {p}; README's Build section does not list it: {documented:?}"
        );
    }
    for p in &documented {
        // gcc: g++ in .ci/run brings it; a plain build needs only the C compiler.
        assert!(
            installed.contains(p) || p == "gcc",
            "README lists {p}, which .ci/run does not install: {installed:?}"
        );
    }
    assert!(
        apt.contains("tests only"),
        "says which packages are for tests only"
    );
}

#[test]
fn every_script_the_readme_runs_exists_and_is_executable() {
    let readme = read("README.md");
    let mut scripts = Vec::new();
    for title in SECTIONS {
        let text = section(&readme, title);
        for block in code_blocks(text) {
            for cmd in commands(&block) {
                let program = cmd.split_whitespace().next().unwrap_or("");
                if program.contains('/') {
                    scripts.push(program.to_string());
                }
            }
        }
        // Repository paths the prose names.
        for word in backticked(text) {
            if word.starts_with("resources/") || word.starts_with(".ci/") {
                let path = word.split_whitespace().next().unwrap_or(&word);
                assert!(root().join(path).exists(), "README's {title} names {path}");
            }
        }
    }
    for needed in [
        "resources/scripts/boot-guest.sh",
        "resources/scripts/run-nested.sh",
        "resources/scripts/test.sh",
    ] {
        assert!(
            scripts.iter().any(|s| s == needed),
            "README runs {needed}: {scripts:?}"
        );
    }
    for script in &scripts {
        let path = root().join(script);
        let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("README runs {script}: {e}"));
        assert!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "{script} is an executable file"
        );
        // Scripts that take --help answer it at once, with their usage, status 0.
        if fs::read_to_string(&path).is_ok_and(|s| s.contains("-h|--help)")) {
            let out = Command::new(&path)
                .arg("--help")
                .output()
                .expect("running it");
            assert!(out.status.success(), "{script} --help: {:?}", out.status);
            assert!(
                String::from_utf8_lossy(&out.stdout).contains(script.trim_start_matches("./")),
                "{script} --help prints its usage"
            );
        }
    }
}

#[test]
fn the_guest_lands_where_the_readme_says() {
    let readme = read("README.md");
    let build = section(&readme, "Build");
    assert!(build.contains("`${CRYPTVM_CACHE:-~/.cache/cryptvm}/guest/`"));
    let script = read("resources/guest/build.sh");
    assert!(
        script.contains("CACHE=\"${CRYPTVM_CACHE:-${HOME:-/root}/.cache/cryptvm}/guest\""),
        "resources/guest/build.sh builds into the cache folder the README names"
    );
    for file in ["vmlinuz", "vmlinux", "initramfs.cpio.gz"] {
        assert!(build.contains(&format!("`{file}`")), "README names {file}");
        assert!(
            script.contains(&format!("$CACHE/{file}")),
            "build.sh makes $CACHE/{file}"
        );
    }
}

#[test]
fn boot_guest_shell_in_nested_mode_says_so_at_once() {
    let started = std::time::Instant::now();
    let out = Command::new(root().join("resources/scripts/boot-guest.sh"))
        .arg("shell")
        .env("CRYPTVM_E2E_MODE", "nested")
        .output()
        .expect("running boot-guest.sh");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keyboard input"), "{stderr}");
    assert!(stderr.contains("cannot reach the guest"), "{stderr}");
    assert!(started.elapsed().as_secs() < 5, "no build, no boot first");
}

#[test]
fn run_nested_carries_the_files_a_config_names() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    for f in [
        "bzImage",
        "initrd.img",
        "disk.qcow2",
        "pass.txt",
        "extra.bin",
    ] {
        fs::write(dir.path().join(f), b"x").expect("writing a file");
    }
    let config = dir.path().join("vm.json");
    fs::write(
        &config,
        r#"{"boot": {"kernel": "bzImage", "initrd": "initrd.img"},
            "objects": [{"qom-type": "secret", "id": "sec0", "file": "pass.txt"}],
            "blockdevs": [{"driver": "qcow2", "node-name": "d0",
                           "file": {"driver": "file", "filename": "disk.qcow2"}}],
            "devices": [{"driver": "virtio-blk-pci", "drive": "d0"}]}"#,
    )
    .expect("writing vm.json");
    let out = Command::new(root().join("resources/scripts/run-nested.sh"))
        .arg("--list-files")
        .arg("--config")
        .arg(&config)
        .arg("--file")
        .arg(dir.path().join("extra.bin"))
        .arg("--cpus")
        .arg("2")
        .output()
        .expect("running run-nested.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    let mut listed: Vec<&str> = listed.lines().collect();
    listed.sort_unstable();
    let d = dir.path().display();
    let mut want: Vec<String> = [
        "vm.json",
        "bzImage",
        "initrd.img",
        "pass.txt",
        "disk.qcow2",
        "extra.bin",
    ]
    .iter()
    .map(|f| format!("{d}/{f}"))
    .collect();
    want.sort_unstable();
    assert_eq!(listed, want);
}

/// A path-like word: a workspace folder, then more.
fn repo_path(word: &str) -> Option<&str> {
    const TOP: [&str; 9] = [
        "docs/",
        "resources/",
        "tests/",
        "vmm/",
        "block/",
        "devices/",
        "img/",
        "fuzz/",
        ".ci/",
    ];
    let word = word.split_whitespace().next()?;
    let word = word.split(':').next()?;
    TOP.iter()
        .any(|t| word.starts_with(t) && word.len() > t.len())
        .then_some(word)
}

#[test]
fn every_path_the_docs_name_resolves() {
    let mut pages = vec![PathBuf::from("README.md")];
    for entry in fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.expect("a docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(PathBuf::from("docs").join(path.file_name().expect("a name")));
        }
    }
    let mut missing = Vec::new();
    for page in &pages {
        let text = read(&page.to_string_lossy());
        let quoted = backticked(&text);
        // QEMU's own files (`docs/devel/...` of QEMU's tree) are not this repository's.
        let foreign = |w: &str| {
            text.find(&format!("`{w}`")).is_some_and(|at| {
                text[..at].trim_end().ends_with("QEMU's") || text[..at].ends_with("QEMU's\n")
            })
        };
        for word in quoted {
            if let Some(path) = repo_path(&word) {
                if !foreign(&word) && !root().join(path).exists() {
                    missing.push(format!("{}: `{path}`", page.display()));
                }
            }
        }
        // Bare page names ("see interface.md"): a page of docs/ or the root.
        for word in text.split(|c: char| c.is_whitespace() || "`(),;".contains(c)) {
            let word = word.trim_end_matches(['.', ':']);
            if word.ends_with(".md")
                && !word.contains('/')
                && word.len() > 3
                && !root().join("docs").join(word).exists()
                && !root().join(word).exists()
            {
                missing.push(format!("{}: {word}", page.display()));
            }
        }
    }
    assert!(missing.is_empty(), "paths that do not resolve: {missing:?}");
}
