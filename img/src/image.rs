//! Opening images named the qemu-img way: a file name (probed or `-f`), a
//! `json:{...}` file name, or an `--image-opts` option string.

use std::path::Path;

use block::blockdev::{BackingFiles, OpenContext};
use block::{keyval, BlockError, BlockGraph, NodeRef, SecretStore};
use serde_json::{json, Map, Value};

use super::cache::CacheMode;
use super::{ImgError, Result};

/// An opened image: its top node (which holds its children).
pub struct Image {
    /// The top node.
    pub node: NodeRef,
}

/// Builds the secrets given with `--object`.
pub fn load_objects(objects: &[String]) -> Result<SecretStore> {
    let mut secrets = SecretStore::new();
    for (i, text) in objects.iter().enumerate() {
        let path = format!("--object[{i}]");
        let map = keyval::parse(text, Some("qom-type"))
            .map_err(|e| BlockError::option(&path, e.to_string()))?;
        secrets.add(&path, Value::Object(map), None)?;
    }
    Ok(secrets)
}

/// How to open an image.
#[derive(Clone, Copy)]
pub struct OpenMode {
    /// Open every node read-only.
    pub read_only: bool,
    /// Metadata only: encrypted images need no key.
    pub no_io: bool,
    /// `-t`/`-T`: the cache mode, if one was given.
    pub cache: Option<CacheMode>,
}

/// Turns an image name into `blockdev-add` options.
pub fn image_options(
    spec: &str,
    image_opts: bool,
    format: Option<&str>,
) -> Result<Map<String, Value>> {
    let parsed = if image_opts {
        if format.is_some() {
            return Err(ImgError::Msg(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        Some(
            keyval::parse(spec, None)
                .map_err(|e| ImgError::Msg(format!("invalid image options: {e}")))?,
        )
    } else if let Some(json_text) = spec.strip_prefix("json:") {
        match serde_json::from_str::<Value>(json_text) {
            Ok(Value::Object(map)) => Some(
                keyval::unflatten(map)
                    .map_err(|e| ImgError::Msg(format!("Could not parse filename {spec}: {e}")))?,
            ),
            Ok(_) => {
                return Err(ImgError::Msg(
                    "Could not parse the JSON options: expected an object".into(),
                ))
            }
            Err(e) => {
                return Err(ImgError::Msg(format!(
                    "Could not parse the JSON options: {e}"
                )))
            }
        }
    } else {
        None
    };
    let mut map = match parsed {
        Some(map) => map,
        None => {
            let mut m = Map::new();
            m.insert("filename".into(), json!(spec));
            if let Some(f) = format {
                m.insert("driver".into(), json!(f));
            }
            m
        }
    };
    if let (Some(f), false) = (format, image_opts) {
        map.entry("driver").or_insert_with(|| json!(f));
    }
    normalize(&mut map, true)?;
    Ok(map)
}

/// Fills in what qemu-img infers: the `file` protocol under a format given a
/// `filename`, and the format of an image named only by its file.
fn normalize(map: &mut Map<String, Value>, top: bool) -> Result<()> {
    let driver = map
        .get("driver")
        .and_then(Value::as_str)
        .map(str::to_string);
    match driver.as_deref() {
        None => {
            // Named by its file alone (`{"file.filename": ...}`): probed, as by qemu-img.
            let file_name = map
                .get("file")
                .and_then(|f| f.get("filename"))
                .and_then(Value::as_str)
                .map(str::to_string);
            if let (true, Some(name)) = (top, file_name) {
                map.insert("driver".into(), json!(probe(Path::new(&name))?));
                return normalize(map, top);
            }
            let Some(filename) = map
                .get("filename")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                let key = if top { "driver" } else { "file.driver" };
                return Err(ImgError::Msg(format!("Parameter '{key}' is missing")));
            };
            if top {
                map.insert("driver".into(), json!(probe(Path::new(&filename))?));
                move_filename_to_file(map);
            } else {
                map.insert("driver".into(), json!("file"));
            }
        }
        Some("file") | Some("host_device") => {}
        Some(_) => move_filename_to_file(map),
    }
    for role in ["file", "header"] {
        if let Some(Value::Object(child)) = map.get_mut(role) {
            normalize(child, false)?;
        }
    }
    Ok(())
}

fn move_filename_to_file(map: &mut Map<String, Value>) {
    if !map.contains_key("file") {
        if let Some(filename) = map.remove("filename") {
            map.insert(
                "file".into(),
                json!({"driver": "file", "filename": filename}),
            );
        }
    }
}

/// `e` in strerror's words ("No such file or directory", without Rust's
/// " (os error 2)").
pub(crate) fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => text[..at].to_string(),
        _ => text,
    }
}

/// Guesses an image's format from its first bytes, as qemu-img does.
fn probe(path: &Path) -> Result<&'static str> {
    use std::io::Read;
    // qemu-img names the file twice (its open, then the file driver's) and gives
    // strerror's text.
    let mut f = std::fs::File::open(path).map_err(|e| {
        let name = path.display().to_string();
        ImgError::Msg(format!("Could not open '{name}': {}", strerror(&e))).opening(&name)
    })?;
    let mut magic = [0u8; 6];
    let n = f
        .read(&mut magic)
        .map_err(|e| ImgError::Msg(format!("Could not read '{}': {e}", path.display())))?;
    Ok(if n == 6 && magic == *b"LUKS\xba\xbe" {
        "luks"
    } else if n >= 4 && magic[..4] == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Opens an image given its options.
pub fn open(mut opts: Map<String, Value>, secrets: &SecretStore, mode: OpenMode) -> Result<Image> {
    if let Some(cache) = mode.cache {
        cache.apply(&mut opts);
    }
    let ctx = OpenContext {
        secrets,
        base_dir: None,
        no_io: mode.no_io,
        read_only: mode.read_only,
        // As qemu-img: the user chose the image.
        backing_files: BackingFiles::Any,
        legacy_aes: true,
    };
    let mut graph = BlockGraph::new();
    let name = graph
        .add("", Value::Object(opts), &ctx, true)
        .map_err(strip_empty_path)?;
    let node = graph.get(&name).expect("node just added");
    let node = match mode.cache {
        Some(cache) => cache.wrap(node),
        None => node,
    };
    Ok(Image { node })
}

/// Errors about the top-level image have an empty key path: say "image" there.
fn strip_empty_path(e: BlockError) -> ImgError {
    match e {
        BlockError::Option { key, msg } if key.is_empty() => ImgError::Msg(msg),
        BlockError::Option { key, msg } => {
            ImgError::Msg(format!("{}: {msg}", key.trim_start_matches('.')))
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_options() {
        let m = image_options("json:{\"driver\":\"luks\",\"file\":{\"filename\":\"p\"},\"header\":{\"filename\":\"h\"}}", false, None)
            .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver":"luks","file":{"filename":"p","driver":"file"},"header":{"filename":"h","driver":"file"}})
        );
        let m = image_options("driver=luks,key-secret=s,file.filename=p", true, None).unwrap();
        assert_eq!(m["file"], json!({"filename":"p","driver":"file"}));
        let m = image_options("x.img", false, Some("raw")).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver":"raw","file":{"driver":"file","filename":"x.img"}})
        );
        assert!(image_options("json:{bad", false, None).is_err());
        assert!(image_options("json:[1]", false, None).is_err());
        assert!(image_options("a=b", true, Some("raw")).is_err());
    }
}
