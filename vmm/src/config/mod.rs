//! The one configuration struct a VM is built from, and its two front ends: the JSON
//! config file and the `cryptvm run` command-line options (interface.md).
//!
//! Both fill the same [`VmConfig`]: the file first, then the options on top (scalars
//! override, lists append). Errors name the key path (`machine.cpus: expected an
//! integer`) or the option (`--cpus: ...`).

pub mod coldplug;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::seccomp::SeccompMode;

/// Most vCPUs a VM may have.
pub const MAX_CPUS: u8 = 32;
/// Guest RAM when nothing says otherwise.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Smallest guest RAM accepted: room for the boot structures below 1 MiB and a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most request workers (`io-workers`) a VM may have.
pub const MAX_IO_WORKERS: u64 = devices::workers::MAX_WORKERS as u64;

/// Kernel command line when neither the file nor the options give one: the console on
/// the 16550A at 0x3f8, reboot through the i8042 (which ends `cryptvm run`), and a
/// panic reboots at once instead of hanging. ACPI is on by default in the kernel.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Why a configuration was refused. The message says where (key path or option).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The VMM's standard output (input from its standard input when a terminal).
    #[default]
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
}

/// One `objects`/`blockdevs`/`devices` entry: the QMP arguments as given, plus the folder
/// relative file names in them resolve against (the config file's folder, or `None` for
/// the current folder when the entry came from the command line).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The QMP `object-add`/`blockdev-add`/`device_add` arguments.
    pub args: Map<String, Value>,
    /// Folder for relative paths inside `args`.
    pub base_dir: Option<PathBuf>,
}

impl Entry {
    /// Resolves `path` (a file name found in `args`) against [`Entry::base_dir`].
    pub fn resolve(&self, path: &str) -> PathBuf {
        resolve(self.base_dir.as_deref(), path)
    }
}

/// Everything a VM is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// vCPUs, 1 to [`MAX_CPUS`].
    pub cpus: u8,
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub memory: u64,
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; [`DEFAULT_CMDLINE`] when `None`.
    pub cmdline: Option<String>,
    /// `object-add` arguments (secrets).
    pub objects: Vec<Entry>,
    /// `blockdev-add` arguments.
    pub blockdevs: Vec<Entry>,
    /// `device_add` arguments.
    pub devices: Vec<Entry>,
    /// QMP control socket path.
    pub qmp: Option<String>,
    /// Serial console destination.
    pub serial: SerialConfig,
    /// Most bytes of guest output a `file:` serial console takes (`serial-max-size`;
    /// 0: no limit), so that a guest cannot fill the host's disk.
    pub serial_max_size: u64,
    /// Request workers shared by every disk queue (`io-workers`); `None`: see
    /// [`VmConfig::io_workers`].
    pub io_workers: Option<usize>,
    /// Seccomp filters on the VMM's threads (`seccomp`: on, off or log).
    pub seccomp: SeccompMode,
    /// How long the guest may run (`timeout`, in seconds; `None`: no limit): then the VMM
    /// stops it and `cryptvm run` exits with status 124 (`TIMEOUT_STATUS` of the `run` command).
    pub timeout: Option<Duration>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            cpus: 1,
            memory: DEFAULT_MEMORY,
            kernel: None,
            initrd: None,
            cmdline: None,
            objects: Vec::new(),
            blockdevs: Vec::new(),
            devices: Vec::new(),
            qmp: None,
            serial: SerialConfig::Stdio,
            serial_max_size: DEFAULT_SERIAL_MAX_SIZE,
            io_workers: None,
            seccomp: SeccompMode::On,
            timeout: None,
        }
    }
}

fn resolve(base: Option<&Path>, path: &str) -> PathBuf {
    let p = Path::new(path);
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// Parses a memory size: a number with an optional `K`, `M`, `G` or `T` suffix (binary
/// units, optionally followed by `iB` or `B`); a bare number means MiB, as QEMU's `-m`.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("'{text}' is not a size (expected e.g. 512M or 2G)"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let suffix = t[digits..].trim().to_ascii_uppercase();
    let suffix = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B').filter(|s| !s.is_empty()))
        .unwrap_or(&suffix);
    let shift = match suffix {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{text}': unknown size suffix (expected K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn check_memory(bytes: u64, text: &str) -> Result<u64, String> {
    if bytes < MIN_MEMORY {
        return Err(format!("'{text}' is too small (at least 2M)"));
    }
    if bytes > MAX_MEMORY {
        return Err(format!("'{text}' is too large (at most 1T)"));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(format!("'{text}' is not a multiple of 4 KiB"));
    }
    Ok(bytes)
}

fn check_io_workers(n: u64) -> Result<usize, String> {
    if n == 0 || n > MAX_IO_WORKERS {
        return Err(format!("{n} I/O workers: give 1 to {MAX_IO_WORKERS}"));
    }
    Ok(n as usize)
}

fn check_cpus(n: u64) -> Result<u8, String> {
    if n == 0 || n > u64::from(MAX_CPUS) {
        return Err(format!("{n} vCPUs: a VM has 1 to {MAX_CPUS} vCPUs"));
    }
    Ok(n as u8)
}

fn expect_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, ConfigError> {
    v.as_str().map_or_else(
        || {
            err(format!(
                "{path}: expected a string, got {}",
                block::options::kind(v)
            ))
        },
        Ok,
    )
}

fn expect_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    v.as_object().map_or_else(
        || {
            err(format!(
                "{path}: expected an object, got {}",
                block::options::kind(v)
            ))
        },
        Ok,
    )
}

/// The keys of the config file, of its `machine` and of its `boot`.
const TOP_KEYS: &[&str] = &[
    "machine",
    "boot",
    "objects",
    "blockdevs",
    "devices",
    "qmp",
    "serial",
    "serial-max-size",
    "timeout",
];
const MACHINE_KEYS: &[&str] = &["cpus", "memory", "io-workers", "seccomp"];
const BOOT_KEYS: &[&str] = &["kernel", "initrd", "cmdline"];

/// Checks `map`'s keys with the block layer's key checker: an unknown one is named
/// (`prefix` + key) before anything is read.
fn check_keys(map: &Map<String, Value>, prefix: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    block::options::check_keys(map.keys(), &[allowed], &[])
        .map_err(|e| ConfigError(format!("{prefix}{}: unknown key", e.key())))
}

fn entries(v: &Value, path: &str, base: Option<&Path>) -> Result<Vec<Entry>, ConfigError> {
    let Value::Array(items) = v else {
        return err(format!(
            "{path}: expected an array, got {}",
            block::options::kind(v)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            Ok(Entry {
                args: expect_object(item, &format!("{path}[{i}]"))?.clone(),
                base_dir: base.map(Path::to_path_buf),
            })
        })
        .collect()
}

impl VmConfig {
    /// Reads a JSON config file on top of `self`. Relative paths in it resolve against the
    /// file's folder.
    pub fn apply_file(&mut self, file: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("reading config '{}': {e}", file.display())))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ConfigError(format!("config '{}': invalid JSON: {e}", file.display())))?;
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.apply_json(&value, Some(&dir))
            .map_err(|e| ConfigError(format!("config '{}': {}", file.display(), e.0)))
    }

    /// Applies a parsed config document; relative paths resolve against `base`.
    pub fn apply_json(&mut self, value: &Value, base: Option<&Path>) -> Result<(), ConfigError> {
        let top = value.as_object().map_or_else(
            || {
                err(format!(
                    "expected a JSON object, got {}",
                    block::options::kind(value)
                ))
            },
            Ok,
        )?;
        check_keys(top, "", TOP_KEYS)?;
        for (key, v) in top {
            match key.as_str() {
                "machine" => self.apply_machine(expect_object(v, "machine")?)?,
                "boot" => {
                    let boot = expect_object(v, "boot")?;
                    check_keys(boot, "boot.", BOOT_KEYS)?;
                    for (k, v) in boot {
                        let path = format!("boot.{k}");
                        match k.as_str() {
                            "kernel" => self.kernel = Some(resolve(base, expect_str(v, &path)?)),
                            "initrd" => self.initrd = Some(resolve(base, expect_str(v, &path)?)),
                            "cmdline" => self.cmdline = Some(expect_str(v, &path)?.to_string()),
                            _ => return err(format!("{path}: unknown key")),
                        }
                    }
                }
                "objects" => self.objects.extend(entries(v, key, base)?),
                "blockdevs" => self.blockdevs.extend(entries(v, key, base)?),
                "devices" => self.devices.extend(entries(v, key, base)?),
                "qmp" => {
                    let addr = expect_str(v, key)?;
                    // `tcp:HOST:PORT` stays as is; a socket path is relative to the file.
                    self.qmp = Some(if addr.starts_with("tcp:") {
                        addr.to_string()
                    } else {
                        resolve(base, addr).to_string_lossy().into_owned()
                    });
                }
                "serial" => {
                    self.serial = parse_serial(expect_str(v, key)?, base)
                        .map_err(|e| ConfigError(format!("serial: {e}")))?
                }
                "serial-max-size" => {
                    let text = match v {
                        Value::Number(n) => n.to_string(),
                        other => expect_str(other, key)?.to_string(),
                    };
                    self.serial_max_size = parse_serial_max_size(&text)
                        .map_err(|e| ConfigError(format!("serial-max-size: {e}")))?
                }
                "timeout" => {
                    let text = match v {
                        Value::Number(n) => n.to_string(),
                        other => expect_str(other, key)?.to_string(),
                    };
                    self.timeout =
                        parse_timeout(&text).map_err(|e| ConfigError(format!("timeout: {e}")))?
                }
                _ => return err(format!("{key}: unknown key")),
            }
        }
        Ok(())
    }

    fn apply_machine(&mut self, machine: &Map<String, Value>) -> Result<(), ConfigError> {
        check_keys(machine, "machine.", MACHINE_KEYS)?;
        for (k, v) in machine {
            let path = format!("machine.{k}");
            let key_err = |e: String| ConfigError(format!("{path}: {e}"));
            match k.as_str() {
                "cpus" => {
                    let n = v.as_u64().ok_or_else(|| {
                        key_err(format!(
                            "expected an integer, got {}",
                            block::options::kind(v)
                        ))
                    })?;
                    self.cpus = check_cpus(n).map_err(key_err)?;
                }
                "io-workers" => {
                    let n = v.as_u64().ok_or_else(|| {
                        key_err(format!(
                            "expected an integer, got {}",
                            block::options::kind(v)
                        ))
                    })?;
                    self.io_workers = Some(check_io_workers(n).map_err(key_err)?);
                }
                "memory" => {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) if n.is_u64() => n.to_string(),
                        _ => {
                            return Err(key_err(format!(
                                "expected a size such as \"512M\", got {}",
                                block::options::kind(v)
                            )))
                        }
                    };
                    self.memory = parse_memory_size(&text)
                        .and_then(|b| check_memory(b, &text))
                        .map_err(key_err)?;
                }
                "seccomp" => {
                    let text = v.as_str().ok_or_else(|| {
                        key_err(format!(
                            "expected \"on\", \"off\" or \"log\", got {}",
                            block::options::kind(v)
                        ))
                    })?;
                    self.seccomp = SeccompMode::parse(text).map_err(key_err)?;
                }
                _ => return err(format!("{path}: unknown key")),
            }
        }
        Ok(())
    }

    /// Builds the configuration of `cryptvm run ARGS`: `--config FILE` first (wherever it
    /// appears), then the other options in order.
    pub fn from_args(args: &[String]) -> Result<VmConfig, ConfigError> {
        let mut pairs = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let Some(name) = arg.strip_prefix("--") else {
                return err(format!(
                    "unexpected argument '{arg}' (options start with --)"
                ));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => {
                    if !OPTIONS.contains(&name) {
                        return err(format!("unknown option '--{name}'"));
                    }
                    i += 1;
                    let v = args
                        .get(i)
                        .ok_or_else(|| ConfigError(format!("--{name}: missing value")))?;
                    (name.to_string(), v.clone())
                }
            };
            if !OPTIONS.contains(&name.as_str()) {
                return err(format!("unknown option '--{name}'"));
            }
            pairs.push((name, value));
            i += 1;
        }
        let mut config = VmConfig::default();
        let configs: Vec<_> = pairs.iter().filter(|(n, _)| n == "config").collect();
        if configs.len() > 1 {
            return err("--config: given more than once");
        }
        if let Some((_, file)) = configs.first() {
            config.apply_file(Path::new(file))?;
        }
        for (name, value) in &pairs {
            config.apply_option(name, value)?;
        }
        Ok(config)
    }

    /// Applies one command-line option (without its `--`).
    pub fn apply_option(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let opt_err = |e: String| ConfigError(format!("--{name}: {e}"));
        match name {
            "config" => {}
            "kernel" => self.kernel = Some(PathBuf::from(value)),
            "initrd" => self.initrd = Some(PathBuf::from(value)),
            "cmdline" => self.cmdline = Some(value.to_string()),
            "cpus" => {
                let n: u64 = value
                    .trim()
                    .parse()
                    .map_err(|_| opt_err(format!("'{value}' is not a number of vCPUs")))?;
                self.cpus = check_cpus(n).map_err(opt_err)?;
            }
            "io-workers" => {
                let n: u64 = value
                    .trim()
                    .parse()
                    .map_err(|_| opt_err(format!("'{value}' is not a number of workers")))?;
                self.io_workers = Some(check_io_workers(n).map_err(opt_err)?);
            }
            "memory" => {
                self.memory = parse_memory_size(value)
                    .and_then(|b| check_memory(b, value))
                    .map_err(opt_err)?
            }
            "object" | "blockdev" | "device" => {
                let implied = match name {
                    "object" => Some("qom-type"),
                    "device" => Some("driver"),
                    _ => None,
                };
                let args =
                    block::keyval::parse(value, implied).map_err(|e| opt_err(e.to_string()))?;
                let entry = Entry {
                    args,
                    base_dir: None,
                };
                match name {
                    "object" => self.objects.push(entry),
                    "blockdev" => self.blockdevs.push(entry),
                    _ => self.devices.push(entry),
                }
            }
            "qmp" => self.qmp = Some(value.to_string()),
            "seccomp" => self.seccomp = SeccompMode::parse(value).map_err(opt_err)?,
            "serial" => self.serial = parse_serial(value, None).map_err(opt_err)?,
            "serial-max-size" => {
                self.serial_max_size = parse_serial_max_size(value).map_err(opt_err)?
            }
            "timeout" => self.timeout = parse_timeout(value).map_err(opt_err)?,
            _ => return err(format!("unknown option '--{name}'")),
        }
        Ok(())
    }

    /// The kernel command line to use.
    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    /// The request workers to start: as configured, else two per host CPU
    /// (at least 4, at most 64: requests mostly wait for the disk).
    pub fn io_workers(&self) -> usize {
        self.io_workers.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            (2 * cpus).clamp(4, 64)
        })
    }
}

const OPTIONS: &[&str] = &[
    "config",
    "kernel",
    "initrd",
    "cmdline",
    "cpus",
    "memory",
    "object",
    "blockdev",
    "device",
    "qmp",
    "serial",
    "serial-max-size",
    "io-workers",
    "seccomp",
    "timeout",
];

/// The longest `timeout`: about 31 years.
pub const MAX_TIMEOUT_SECS: f64 = 1e9;

/// Seconds as timeout(1) takes them (`2`, `0.5`); `0` means no limit.
fn parse_timeout(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    let bad = || format!("'{text}' is not a number of seconds (0: no limit)");
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let secs: f64 = t.parse().map_err(|_| bad())?;
    if secs > MAX_TIMEOUT_SECS {
        return Err(format!(
            "'{text}' is too long (at most {MAX_TIMEOUT_SECS:e} s)"
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)).filter(|d| !d.is_zero()))
}

/// The default `serial-max-size`: 1 GiB.
pub const DEFAULT_SERIAL_MAX_SIZE: u64 = 1 << 30;

/// A byte count with qemu-img's suffixes (`64M`), 0 for no limit.
fn parse_serial_max_size(text: &str) -> Result<u64, String> {
    block::options::parse_size(text)
        .ok_or_else(|| format!("'{text}' is not a size (bytes, or with k, M, G, T; 0: no limit)"))
}

fn parse_serial(text: &str, base: Option<&Path>) -> Result<SerialConfig, String> {
    if text == "stdio" {
        Ok(SerialConfig::Stdio)
    } else if let Some(path) = text.strip_prefix("file:").filter(|p| !p.is_empty()) {
        Ok(SerialConfig::File(resolve(base, path)))
    } else {
        Err(format!("'{text}': expected \"stdio\" or \"file:PATH\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("512"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2 << 30));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("64k"), Ok(64 << 10));
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("5X").is_err());
        assert!(parse_memory_size("99999999999999999999T").is_err());
    }

    #[test]
    fn file_then_options() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.json");
        std::fs::write(
            &file,
            json!({
                "machine": {"cpus": 2, "memory": "1G"},
                "boot": {"kernel": "guest/vmlinuz", "initrd": "/abs/initrd", "cmdline": "quiet"},
                "blockdevs": [{"node-name": "d", "driver": "file", "filename": "disk.raw"}],
                "serial": "file:console.log",
                "qmp": "vm.sock"
            })
            .to_string(),
        )
        .unwrap();
        let c = VmConfig::from_args(&args(&[
            "--cpus",
            "4",
            "--config",
            file.to_str().unwrap(),
            "--blockdev=driver=file,node-name=e,filename=x",
            "--device",
            "virtio-blk-pci,drive=e",
            "--object",
            "secret,id=s,data=x",
        ]))
        .unwrap();
        assert_eq!(c.cpus, 4);
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.kernel, Some(dir.path().join("guest/vmlinuz")));
        assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
        assert_eq!(c.cmdline(), "quiet");
        assert_eq!(c.serial, SerialConfig::File(dir.path().join("console.log")));
        assert_eq!(
            c.qmp.as_deref(),
            Some(dir.path().join("vm.sock").to_str().unwrap())
        );
        assert_eq!(c.blockdevs.len(), 2);
        assert_eq!(
            c.blockdevs[0].resolve("disk.raw"),
            dir.path().join("disk.raw")
        );
        assert_eq!(c.blockdevs[1].base_dir, None);
        assert_eq!(c.devices[0].args["driver"], "virtio-blk-pci");
        assert_eq!(c.objects[0].args["qom-type"], "secret");
    }

    #[test]
    fn errors_name_the_key() {
        let e = |v: Value| VmConfig::default().apply_json(&v, None).unwrap_err().0;
        assert_eq!(
            e(json!({"machine": {"cpus": "2"}})),
            "machine.cpus: expected an integer, got a string"
        );
        assert_eq!(
            e(json!({"machine": {"sockets": 2}})),
            "machine.sockets: unknown key"
        );
        assert_eq!(e(json!({"bogus": 1})), "bogus: unknown key");
        assert!(e(json!({"machine": {"cpus": 0}})).starts_with("machine.cpus: 0 vCPUs"));
        assert!(e(json!({"machine": {"cpus": 33}})).starts_with("machine.cpus: 33 vCPUs"));
        assert!(e(json!({"machine": {"io-workers": 0}})).starts_with("machine.io-workers: 0 I/O"));
        assert!(e(json!({"machine": {"memory": "1"}})).contains("too small"));
        assert_eq!(
            e(json!({"devices": [1]})),
            "devices[0]: expected an object, got a number"
        );
        assert_eq!(
            e(json!({"devices": {}})),
            "devices: expected an array, got an object"
        );
        assert!(e(json!({"serial": "tcp:1"})).starts_with("serial: "));
        assert_eq!(
            e(json!({"boot": {"kernel": 1}})),
            "boot.kernel: expected a string, got a number"
        );
    }

    #[test]
    fn option_errors() {
        let e = |a: &[&str]| VmConfig::from_args(&args(a)).unwrap_err().0;
        assert!(e(&["--cpus", "0"]).starts_with("--cpus: 0 vCPUs"));
        assert!(e(&["--cpus", "x"]).starts_with("--cpus:"));
        assert!(e(&["--io-workers", "0"]).starts_with("--io-workers: 0 I/O workers"));
        assert!(e(&["--io-workers", "many"]).starts_with("--io-workers:"));
        assert!(e(&["--frobnicate", "1"]).contains("unknown option"));
        assert!(e(&["--kernel"]).contains("missing value"));
        assert!(e(&["--serial", "pty"]).starts_with("--serial:"));
        assert!(e(&["--blockdev", "{bad"]).starts_with("--blockdev: invalid JSON"));
        assert!(e(&["--timeout", "soon"]).starts_with("--timeout: 'soon' is not a number"));
        assert!(e(&["--timeout", "-1"]).starts_with("--timeout: '-1' is not a number"));
        assert!(e(&["--timeout", "1e99"]).starts_with("--timeout:"));
        assert!(e(&["--timeout", "99999999999"]).contains("too long"));
        assert!(e(&["--timeout"]).contains("missing value"));
    }

    #[test]
    fn timeouts() {
        let t = |a: &[&str]| VmConfig::from_args(&args(a)).unwrap().timeout;
        assert_eq!(t(&[]), None);
        assert_eq!(t(&["--timeout", "2"]), Some(Duration::from_secs(2)));
        assert_eq!(t(&["--timeout=0.5"]), Some(Duration::from_millis(500)));
        assert_eq!(t(&["--timeout", "0"]), None);
        let mut c = VmConfig::default();
        c.apply_json(&json!({"timeout": 3}), None).unwrap();
        assert_eq!(c.timeout, Some(Duration::from_secs(3)));
        c.apply_json(&json!({"timeout": "1.5"}), None).unwrap();
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            VmConfig::default()
                .apply_json(&json!({"timeout": true}), None)
                .unwrap_err()
                .0,
            "timeout: expected a string, got a boolean"
        );
    }

    #[test]
    fn debug_exit_devices_from_the_file_and_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.json");
        std::fs::write(
            &file,
            json!({"devices": [{"driver": "isa-debug-exit", "iobase": "0xf4", "iosize": "0x04"}]})
                .to_string(),
        )
        .unwrap();
        let c = VmConfig::from_args(&args(&[
            "--config",
            file.to_str().unwrap(),
            "--device",
            "isa-debug-exit,iobase=0x600,iosize=1",
        ]))
        .unwrap();
        assert_eq!(c.devices[0].args["iobase"], "0xf4");
        assert_eq!(c.devices[1].args["iobase"], "0x600");
        assert_eq!(c.devices[1].args["driver"], "isa-debug-exit");
    }
}
