//! `-o help` (or `-o ?`) of `img create` and `img convert`: a format's creation
//! options in qemu-img's layout. Only the options (and values) this tool implements
//! are listed; qemu-img's others are refused with an error when given. cryptvm's own
//! luks options (`luks-version=2` and the LUKS2 ones, docs/luks.md) are not listed, so
//! that the output stays qemu-img's.

/// One creation option: name, type as qemu-img shows it, help text.
type Opt = (&'static str, &'static str, &'static str);

const SIZE: Opt = ("size", "size", "Virtual disk size");

const RAW: &[Opt] = &[SIZE];

const LUKS: &[Opt] = &[
    ("cipher-alg", "str", "Name of encryption cipher algorithm"),
    ("cipher-mode", "str", "Name of encryption cipher mode"),
    (
        "detached-header",
        "bool (on/off)",
        "Create a detached LUKS header",
    ),
    ("hash-alg", "str", "Name of encryption hash algorithm"),
    ("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    ("ivgen-alg", "str", "Name of IV generator algorithm"),
    (
        "ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
    ),
    (
        "key-secret",
        "str",
        "ID of the secret that provides the keyslot passphrase",
    ),
    SIZE,
];

const QCOW2: &[Opt] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    (
        "compat",
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    (
        "compression_type",
        "str",
        "Compression method used for image cluster compression",
    ),
    (
        "lazy_refcounts",
        "bool (on/off)",
        "Postpone refcount updates",
    ),
    (
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata)",
    ),
    (
        "refcount_bits",
        "num",
        "Width of a reference count entry in bits",
    ),
    SIZE,
];

/// What the file protocol adds when a target file is named.
const FILE: &[Opt] = &[(
    "preallocation",
    "str",
    "Preallocation mode (allowed values: off)",
)];

/// Whether the `-o` values ask for help: an option `help` or `?` among them.
pub fn wanted(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|item| item == "help" || item == "?")
}

/// The help text for `format` (None: a format this tool cannot create). With a
/// target file named, the file protocol's options are merged in, as qemu-img does.
pub fn text(format: &str, with_file: bool) -> Option<String> {
    let own = match format {
        "raw" => RAW,
        "luks" => LUKS,
        "qcow2" => QCOW2,
        _ => return None,
    };
    let mut opts: Vec<Opt> = own.to_vec();
    if with_file {
        for o in FILE {
            if !opts.iter().any(|(name, ..)| name == &o.0) {
                opts.push(*o);
            }
        }
        opts.sort_by_key(|o| o.0);
    }
    let mut out = if with_file {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {format} options:\n")
    };
    for (name, ty, help) in opts {
        out += &format!("  {:<22} - {help}\n", format!("{name}=<{ty}>"));
    }
    if !with_file {
        out += "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n";
    }
    Some(out)
}

/// Prints the help of `format` as qemu-img does: exit status 0, or its error for a
/// format without creation options here.
pub fn print(format: &str, with_file: bool) -> super::Result<u8> {
    let text = text(format, with_file).ok_or_else(|| {
        super::ImgError::Msg(format!(
            "Unknown file format '{format}' (supported: raw, luks, qcow2)"
        ))
    })?;
    print!("{text}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_asked_for_by_a_whole_item() {
        assert!(wanted(&["help".into()]));
        assert!(wanted(&["cluster_size=4k,?".into()]));
        assert!(!wanted(&["key-secret=help".into()]));
    }

    #[test]
    fn layout_is_qemu_imgs() {
        assert_eq!(
            text("raw", false).unwrap(),
            "Supported raw options:\n  size=<size>            - Virtual disk size\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n"
        );
        let luks = text("luks", true).unwrap();
        assert!(luks.starts_with("Supported options:\n  cipher-alg=<str>       - Name"));
        assert!(
            luks.contains("  detached-header=<bool (on/off)> - Create a detached LUKS header\n")
        );
        assert!(text("vmdk", false).is_none());
    }
}
