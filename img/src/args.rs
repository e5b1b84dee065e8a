//! Command-line parsing in qemu-img's style: short options with separate or
//! attached values, `--long=value`, repeated `--object` and `-o`.

use std::collections::VecDeque;

use super::cache::CacheMode;

/// A command-line error (bad or missing option).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArgError(pub String);

/// The options of one `img` sub-command.
#[derive(Debug, Default)]
pub struct Args {
    /// `--object` values, in order.
    pub objects: Vec<String>,
    /// `-f`: source / image format.
    pub format: Option<String>,
    /// `-F`: second image's format (compare).
    pub format2: Option<String>,
    /// `-O`: output format (convert).
    pub output_format: Option<String>,
    /// `-o`: creation options, joined with commas.
    pub options: Vec<String>,
    /// `--output=human|json`.
    pub json: bool,
    /// `--image-opts`: file names are option strings.
    pub image_opts: bool,
    /// `--target-image-opts`: the target is an option string.
    pub target_image_opts: bool,
    /// `-p`: show progress.
    pub progress: bool,
    /// `-q`: quiet.
    pub quiet: bool,
    /// `-n`: do not create the target.
    pub no_create: bool,
    /// `-s`: strict compare.
    pub strict: bool,
    /// `--backing-chain`: every image of the backing chain (info).
    pub backing_chain: bool,
    /// `--shrink`: a resize may make the image smaller.
    pub shrink: bool,
    /// Long options with a value that only one sub-command knows
    /// (`--pattern`, `--flush-interval`, `--start-offset`, `--max-length`,
    /// `--preallocation`), as given.
    pub extra: Vec<(String, String)>,
    /// Other valued short options (`-c 100`), as given.
    pub short: Vec<(char, String)>,
    /// Other flags (`-w`), as given.
    pub short_flags: Vec<char>,
    /// Positional arguments.
    pub positional: Vec<String>,
    /// `-t`: cache mode of the image written (or the only image).
    pub cache: Option<CacheMode>,
    /// `-T`: cache mode of the source image(s).
    pub src_cache: Option<CacheMode>,
}

impl Args {
    /// Parses `argv` (after the sub-command name). `flags` lists the short
    /// flags the sub-command accepts, `valued` the short options with a value.
    pub fn parse(argv: &[String], flags: &str, valued: &str) -> Result<Self, ArgError> {
        let mut a = Args::default();
        let mut q: VecDeque<String> = argv.iter().cloned().collect();
        while let Some(arg) = q.pop_front() {
            if arg == "--" {
                a.positional.extend(q.drain(..));
                break;
            }
            if let Some(long) = arg.strip_prefix("--") {
                let (name, inline) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                let value = |q: &mut VecDeque<String>| {
                    inline
                        .clone()
                        .or_else(|| q.pop_front())
                        .ok_or_else(|| ArgError(format!("option '--{name}' requires an argument")))
                };
                match name {
                    "object" => a.objects.push(value(&mut q)?),
                    "output" => a.json = output_is_json(&value(&mut q)?)?,
                    "image-opts" => a.image_opts = true,
                    "target-image-opts" => a.target_image_opts = true,
                    "force-share" => {}
                    "format" => a.format = Some(value(&mut q)?),
                    "backing-chain" => a.backing_chain = true,
                    "shrink" => a.shrink = true,
                    "force" => a.short_flags.push('!'),
                    "pattern" | "flush-interval" | "start-offset" | "max-length"
                    | "preallocation" | "size" => {
                        let v = value(&mut q)?;
                        a.extra.push((name.to_string(), v));
                    }
                    "no-drain" => a.short_flags.push('D'),
                    _ => return Err(ArgError(format!("unrecognized option '--{name}'"))),
                }
                continue;
            }
            if arg.len() > 1 && arg.starts_with('-') {
                for (i, c) in arg[1..].char_indices() {
                    if valued.contains(c) {
                        let rest = &arg[1 + i + c.len_utf8()..];
                        let v = if rest.is_empty() {
                            q.pop_front().ok_or_else(|| {
                                ArgError(format!("option requires an argument -- '{c}'"))
                            })?
                        } else {
                            rest.to_string()
                        };
                        match c {
                            'f' => a.format = Some(v),
                            'F' => a.format2 = Some(v),
                            'O' => a.output_format = Some(v),
                            'o' => a.options.push(v),
                            't' => a.cache = Some(CacheMode::parse(&v).map_err(ArgError)?),
                            'T' => a.src_cache = Some(CacheMode::parse(&v).map_err(ArgError)?),
                            other => a.short.push((other, v)),
                        }
                        break;
                    }
                    if !flags.contains(c) {
                        return Err(ArgError(format!("invalid option -- '{c}'")));
                    }
                    match c {
                        'p' => a.progress = true,
                        'q' => a.quiet = true,
                        'n' => a.no_create = true,
                        's' => a.strict = true,
                        other => a.short_flags.push(other),
                    }
                }
                continue;
            }
            a.positional.push(arg);
        }
        Ok(a)
    }

    /// The `-o` options as one keyval string. As in qemu-img's option lists, `-o` may
    /// be repeated and a key given twice keeps its last value.
    pub fn joined_options(&self) -> String {
        let joined = self.options.join(",");
        let items = split_items(&joined);
        let key = |item: &str| item.split_once('=').map_or(item, |(k, _)| k).to_string();
        items
            .iter()
            .enumerate()
            .filter(|(i, item)| !items[i + 1..].iter().any(|later| key(later) == key(item)))
            .map(|(_, item)| item.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `key=value` items of an option string, split at single commas (`,,` is an escaped
/// comma inside a value, kept as it is).
fn split_items(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            item.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            item.push_str(",,");
        } else {
            items.push(std::mem::take(&mut item));
        }
    }
    items.push(item);
    items.retain(|i| !i.is_empty());
    items
}

/// `--output=json|human`.
fn output_is_json(value: &str) -> Result<bool, ArgError> {
    match value {
        "json" => Ok(true),
        "human" => Ok(false),
        other => Err(ArgError(format!(
            "--output must be used with human or json as argument, not '{other}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn qemu_img_style() {
        let a = Args::parse(
            &argv("--object secret,id=s,data=x -f luks -o a=1 -okey-secret=s -p --output=json --image-opts src dst"),
            "pqn",
            "fFOotT",
        )
        .unwrap();
        assert_eq!(a.objects, vec!["secret,id=s,data=x"]);
        assert_eq!(a.format.as_deref(), Some("luks"));
        assert_eq!(a.joined_options(), "a=1,key-secret=s");
        assert!(a.progress && a.json && a.image_opts);
        assert_eq!(a.positional, vec!["src", "dst"]);
    }

    #[test]
    fn repeated_options_keep_the_last_value() {
        let a = Args::parse(
            &argv("-o iter-time=10,x=a,,b -o iter-time=20 -o cluster_size=4k"),
            "",
            "o",
        )
        .unwrap();
        assert_eq!(a.joined_options(), "x=a,,b,iter-time=20,cluster_size=4k");
    }

    #[test]
    fn errors() {
        assert!(Args::parse(&argv("-z"), "p", "f").is_err());
        assert!(Args::parse(&argv("-f"), "p", "f").is_err());
        assert!(Args::parse(&argv("--output=xml"), "p", "f").is_err());
        assert!(Args::parse(&argv("--bogus"), "p", "f").is_err());
    }
}
