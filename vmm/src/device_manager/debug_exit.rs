//! `isa-debug-exit` as a `devices` entry (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`):
//! QEMU's properties and defaults, and the device placed on the port bus, where a guest
//! write ends the VM with [`ExitReason::DebugExit`] (`cryptvm run` exits with
//! `(V << 1) | 1`). It is cold-plugged only: QMP's `device_add` gets QEMU's refusal.

use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value};

use devices::debug_exit::{DebugExit, DEFAULT_IOBASE, DEFAULT_IOSIZE};
use devices::Bus;

use crate::device_manager::virtio_blk::{check_id, PropertyError};
use crate::vstate::exit::{ExitReason, ExitState};

/// The device model's name.
pub const DRIVER: &str = "isa-debug-exit";
/// QEMU's answer to a `device_add` of a device on the ISA bus once the machine runs.
pub const NO_HOTPLUG: &str = "Bus 'isa.0' does not support hotplugging";
/// One past the last I/O port.
const PORT_SPACE: u64 = 0x1_0000;

/// Whether `device_add` arguments ask for an `isa-debug-exit`.
pub fn is_driver(args: &Map<String, Value>) -> bool {
    args.get("driver").and_then(Value::as_str) == Some(DRIVER)
}

/// An `isa-debug-exit`'s properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebugExitProps {
    /// `id`.
    pub id: Option<String>,
    /// `iobase`: the first port (default 0x501).
    pub iobase: u16,
    /// `iosize`: how many ports (default 2; at most 0x10000 - `iobase`).
    pub iosize: u32,
}

/// Why the device could not be placed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugExitError {
    /// Its ports are another device's.
    #[error("{DRIVER}: I/O ports {iobase:#x}..{last:#x} overlap another device", last = u32::from(*iobase) + *iosize - 1)]
    Overlap {
        /// `iobase`.
        iobase: u16,
        /// `iosize`.
        iosize: u32,
    },
}

fn err<T>(msg: impl Into<String>) -> Result<T, PropertyError> {
    Err(PropertyError(msg.into()))
}

impl DebugExitProps {
    /// Parses `device_add` arguments with `driver` `isa-debug-exit`: numbers or strings
    /// (`"0xf4"`, as the dotted key=value form gives every value) for `iobase` and
    /// `iosize`, QEMU's words for unknown properties and bad values.
    pub fn parse(args: &Map<String, Value>) -> Result<DebugExitProps, PropertyError> {
        if !is_driver(args) {
            return err(format!("'{}' is not {DRIVER}", args_driver(args)));
        }
        let mut id = None;
        let mut iobase = u32::from(DEFAULT_IOBASE);
        let mut iosize = u32::from(DEFAULT_IOSIZE);
        for (key, value) in args {
            match key.as_str() {
                "driver" => {}
                "id" => {
                    let Value::String(s) = value else {
                        return err("Invalid parameter type for 'id', expected: string");
                    };
                    check_id(s)?;
                    id = Some(s.clone());
                }
                "iobase" => iobase = uint32(key, value)?,
                "iosize" => iosize = uint32(key, value)?,
                _ => return err(format!("Property '{DRIVER}.{key}' not found")),
            }
        }
        if iosize == 0 {
            return err(format!("Property {DRIVER}.iosize must be at least 1"));
        }
        if u64::from(iobase) + u64::from(iosize) > PORT_SPACE {
            return err(format!(
                "Property {DRIVER}.iobase: ports {iobase:#x}+{iosize:#x} go past the last I/O port (0xffff)"
            ));
        }
        Ok(DebugExitProps {
            id,
            // Fits: iobase + iosize <= 0x10000 and iosize >= 1.
            iobase: iobase as u16,
            iosize,
        })
    }
}

fn args_driver(args: &Map<String, Value>) -> String {
    args.get("driver")
        .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string))
        .unwrap_or_default()
}

/// A `uint32` property: a JSON number, or a string in C's notation (`0x` hex, `0`
/// octal, decimal), as QEMU's keyval visitor reads it.
fn uint32(key: &str, value: &Value) -> Result<u32, PropertyError> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_c_integer(s.trim())
            .ok_or_else(|| PropertyError(format!("Parameter '{key}' expects integer")))
            .map(Some)?,
        _ => {
            return err(format!(
                "Invalid parameter type for '{key}', expected: integer"
            ))
        }
    };
    n.and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| PropertyError(format!("Parameter '{key}' expects uint32_t")))
}

fn parse_c_integer(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Places the device described by `props` on the port bus `pio`; a guest write ends the
/// VM through `exit` with [`ExitReason::DebugExit`] and the value written.
pub fn place(
    pio: &RwLock<Bus>,
    exit: Arc<ExitState>,
    props: &DebugExitProps,
) -> Result<(), DebugExitError> {
    let device = DebugExit::new(Box::new(move |value| {
        exit.request(ExitReason::DebugExit(value))
    }));
    pio.write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            u64::from(props.iobase),
            u64::from(props.iosize),
            Arc::new(Mutex::new(device)),
        )
        .map_err(|_| DebugExitError::Overlap {
            iobase: props.iobase,
            iosize: props.iosize,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<DebugExitProps, String> {
        DebugExitProps::parse(v.as_object().unwrap()).map_err(|e| e.0)
    }

    fn keyval(text: &str) -> Map<String, Value> {
        block::keyval::parse(text, Some("driver")).unwrap()
    }

    #[test]
    fn defaults_are_qemus() {
        assert_eq!(
            parse(json!({"driver": "isa-debug-exit"})),
            Ok(DebugExitProps {
                id: None,
                iobase: 0x501,
                iosize: 2
            })
        );
    }

    #[test]
    fn numbers_strings_and_the_command_line() {
        let want = DebugExitProps {
            id: Some("dbg".into()),
            iobase: 0xf4,
            iosize: 4,
        };
        assert_eq!(
            parse(
                json!({"driver": "isa-debug-exit", "id": "dbg", "iobase": "0xf4", "iosize": "0x04"})
            ),
            Ok(want.clone())
        );
        assert_eq!(
            parse(json!({"driver": "isa-debug-exit", "id": "dbg", "iobase": 244, "iosize": 4})),
            Ok(want.clone())
        );
        let args = keyval("isa-debug-exit,iobase=0xf4,iosize=0x04,id=dbg");
        assert_eq!(DebugExitProps::parse(&args), Ok(want));
        assert!(is_driver(&args));
        assert!(!is_driver(&keyval("virtio-blk-pci,drive=d")));
        assert_eq!(
            parse(json!({"driver": "isa-debug-exit", "iobase": "010"}))
                .unwrap()
                .iobase,
            8
        );
    }

    #[test]
    fn bad_properties_get_qemus_errors() {
        let e = |v: Value| parse(v).unwrap_err();
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "ioabse": 1})),
            "Property 'isa-debug-exit.ioabse' not found"
        );
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "iobase": "port"})),
            "Parameter 'iobase' expects integer"
        );
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "iobase": -1})),
            "Parameter 'iobase' expects uint32_t"
        );
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "iosize": 1u64 << 32})),
            "Parameter 'iosize' expects uint32_t"
        );
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "iosize": true})),
            "Invalid parameter type for 'iosize', expected: integer"
        );
        assert_eq!(
            e(json!({"driver": "isa-debug-exit", "id": "1x"})),
            "Parameter 'id' expects an identifier"
        );
        assert!(e(json!({"driver": "isa-debug-exit", "iosize": 0})).contains("at least 1"));
        assert!(
            e(json!({"driver": "isa-debug-exit", "iobase": 0xffff, "iosize": 2}))
                .contains("last I/O port")
        );
        assert!(e(json!({"driver": "virtio-blk-pci"})).contains("not isa-debug-exit"));
    }

    #[test]
    fn placed_on_the_bus_it_ends_the_vm() {
        let exit = Arc::new(ExitState::new().unwrap());
        let pio = RwLock::new(Bus::new());
        let props = DebugExitProps {
            id: None,
            iobase: 0xf4,
            iosize: 4,
        };
        place(&pio, exit.clone(), &props).unwrap();
        assert_eq!(
            place(&pio, exit.clone(), &props),
            Err(DebugExitError::Overlap {
                iobase: 0xf4,
                iosize: 4
            })
        );
        assert_eq!(
            DebugExitError::Overlap {
                iobase: 0xf4,
                iosize: 4
            }
            .to_string(),
            "isa-debug-exit: I/O ports 0xf4..0xf7 overlap another device"
        );
        assert!(!exit.stopping());
        let bus = pio.read().unwrap();
        bus.write(0xf6, &[5]);
        assert!(exit.stopping());
        assert_eq!(exit.wait(None), Ok(ExitReason::DebugExit(5)));
    }
}
