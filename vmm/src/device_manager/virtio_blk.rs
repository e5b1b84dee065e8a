//! `virtio-blk-pci`: QEMU's device properties, and a live device — the
//! virtio PCI function on bus 0, its BAR and doorbells, one MSI vector per
//! queue plus one for configuration changes, and one I/O thread per queue.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use block::options::{check_keys, KeyError};
use block::NodeRef;
use devices::virtio::block::{BlockConfig, BlockConfigError, IoErrorReporter, VirtioBlock};
use devices::virtio::{FaultReporter, VirtioPciDevice, VirtioQueues, BAR_SIZE};
use devices::{Interrupt, SharedDevice, WorkerPool};

use crate::device_manager::pci_bars::{Doorbell, PciBars};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::msi::{MsiRouter, MsiVector};

/// The one device model `device_add` knows.
pub const DRIVER: &str = "virtio-blk-pci";
/// The most queues a device may have (the devices crate's limit: MSI-X
/// table room in the BAR).
pub const MAX_QUEUES: u16 = devices::virtio::block::MAX_QUEUES;
/// The properties of a `virtio-blk-pci` device (with `driver`).
pub const PROPERTIES: &[&str] = &[
    "driver",
    "id",
    "drive",
    "serial",
    "num-queues",
    "queue-size",
    "logical_block_size",
    "physical_block_size",
    "discard",
    "write-zeroes",
    "addr",
    "bus",
    "bootindex",
];

/// A device property error, worded as QEMU words it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PropertyError(pub String);

impl From<BlockConfigError> for PropertyError {
    fn from(e: BlockConfigError) -> Self {
        PropertyError(match e {
            BlockConfigError::NumQueues(n) => format!(
                "Property {DRIVER}.num-queues doesn't take value {n} (minimum: 1, maximum: {MAX_QUEUES})"
            ),
            BlockConfigError::BlockSizeRange { name, value } => format!(
                "Property {DRIVER}.{name} doesn't take value {value} (minimum: 512, maximum: 32768)"
            ),
            BlockConfigError::BlockSizePowerOfTwo { name, value } => format!(
                "Property {DRIVER}.{name} doesn't take value '{value}', it's not a power of 2"
            ),
            other => other.to_string(),
        })
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, PropertyError> {
    Err(PropertyError(msg.into()))
}

/// The properties of a `virtio-blk-pci` device (`device_add` arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkProps {
    /// `id` (QEMU allows none; such a device cannot be `device_del`ed).
    pub id: Option<String>,
    /// `drive`: the node-name of the block node.
    pub drive: String,
    /// `addr`: the PCI slot, or the lowest free one.
    pub slot: Option<u8>,
    /// The virtio-blk configuration.
    pub config: BlockConfig,
    /// Whether `logical_block_size` was given; if not, the drive's block size
    /// ([`block::BlockNode::block_size`]) is used.
    pub logical_block_size_given: bool,
}

impl BlkProps {
    /// Parses `device_add` arguments; `cpus` sets the default `num-queues`
    /// (one per vCPU, as QEMU does).
    pub fn parse(args: &Map<String, Value>, cpus: u8) -> Result<BlkProps, PropertyError> {
        let driver = match args.get("driver") {
            Some(Value::String(d)) => d.as_str(),
            Some(_) => return err("Invalid parameter type for 'driver', expected: string"),
            None => return err("Parameter 'driver' is missing"),
        };
        if driver != DRIVER {
            return err(format!("'{driver}' is not a valid device model name"));
        }
        // Every key known before any is read: a misspelt one is named.
        check_keys(args.keys(), &[PROPERTIES], &[]).map_err(|e| match e {
            KeyError::Unexpected(key) => {
                PropertyError(format!("Property '{DRIVER}.{key}' not found"))
            }
            KeyError::Missing(key) => PropertyError(format!("Parameter '{key}' is missing")),
        })?;
        let mut props = BlkProps {
            id: None,
            drive: String::new(),
            slot: None,
            config: BlockConfig {
                num_queues: u16::from(cpus.max(1)).min(MAX_QUEUES),
                ..BlockConfig::default()
            },
            logical_block_size_given: false,
        };
        let mut drive = None;
        for (key, value) in args {
            let c = &mut props.config;
            match key.as_str() {
                "driver" => {}
                "id" => {
                    let id = string(key, value)?;
                    check_id(&id)?;
                    props.id = Some(id);
                }
                "drive" => drive = Some(string(key, value)?),
                "serial" => c.serial = string(key, value)?,
                // The ranges are the device's (BlockConfig::validate), checked
                // once all properties are read; here only the type's.
                "num-queues" => c.num_queues = number(key, value, 0, u64::from(u16::MAX))? as u16,
                "queue-size" => c.queue_size = number(key, value, 0, u64::from(u16::MAX))? as u16,
                "logical_block_size" => {
                    c.logical_block_size = number(key, value, 0, u64::from(u32::MAX))? as u32;
                    props.logical_block_size_given = true;
                }
                "physical_block_size" => {
                    c.physical_block_size = number(key, value, 0, u64::from(u32::MAX))? as u32
                }
                "discard" => c.discard = boolean(key, value)?,
                "write-zeroes" => c.write_zeroes = boolean(key, value)?,
                "addr" => props.slot = Some(pci_addr(value)?),
                "bus" => {
                    let bus = string(key, value)?;
                    if bus != "pci.0" && bus != "pcie.0" {
                        return err(format!("Bus '{bus}' not found"));
                    }
                }
                // Accepted for libvirt compatibility; no firmware boots from disks here.
                "bootindex" => {
                    number(key, value, 0, i32::MAX as u64)?;
                }
                _ => return err(format!("Property '{DRIVER}.{key}' not found")),
            }
        }
        props.drive = match drive {
            Some(d) if !d.is_empty() => d,
            _ => return err("drive property not set"),
        };
        props.config.validate()?;
        Ok(props)
    }
}

impl BlkProps {
    /// The configuration for a device over `node`: without a
    /// `logical_block_size`, the node's block size (up to the largest the
    /// device takes), with `physical_block_size` at least as large, so that a
    /// guest on a LUKS2 volume of 4096-byte sectors writes whole sectors.
    pub fn config_for(&self, node: &dyn block::BlockNode) -> BlockConfig {
        let mut c = self.config.clone();
        if !self.logical_block_size_given {
            let size = node.block_size().clamp(512, 32768) as u32;
            if size.is_power_of_two() {
                c.logical_block_size = size;
                c.physical_block_size = c.physical_block_size.max(size);
            }
        }
        c
    }
}

/// QEMU's rule for device ids: a letter, then letters, digits, '-', '.', '_'.
pub(crate) fn check_id(id: &str) -> Result<(), PropertyError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        err("Parameter 'id' expects an identifier")
    }
}

fn string(key: &str, value: &Value) -> Result<String, PropertyError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        _ => err(format!(
            "Invalid parameter type for '{key}', expected: string"
        )),
    }
}

fn number(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, PropertyError> {
    let n = match value {
        Value::Number(n) => n.as_u64(),
        // The dotted key=value form gives every value as a string.
        Value::String(s) => parse_int(s),
        _ => {
            return err(format!(
                "Invalid parameter type for '{key}', expected: integer"
            ))
        }
    };
    match n {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => err(format!(
            "Property {DRIVER}.{key} doesn't take value {n} (minimum: {min}, maximum: {max})"
        )),
        None => err(format!("Parameter '{key}' expects an integer")),
    }
}

fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn boolean(key: &str, value: &Value) -> Result<bool, PropertyError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.as_str() {
            "on" | "yes" | "true" => Ok(true),
            "off" | "no" | "false" => Ok(false),
            _ => err(format!("Parameter '{key}' expects 'on' or 'off'")),
        },
        _ => err(format!(
            "Invalid parameter type for '{key}', expected: boolean"
        )),
    }
}

/// `addr`: QEMU's `slot[.function]` in hex (`"0x5"`, `"05.0"`), or an integer.
fn pci_addr(value: &Value) -> Result<u8, PropertyError> {
    let bad = || err("Property 'virtio-blk-pci.addr' doesn't take value; expected slot[.function]");
    let (slot, func) = match value {
        Value::Number(n) => (n.as_u64(), Some(0)),
        Value::String(s) => {
            let (slot, func) = match s.split_once('.') {
                Some((slot, func)) => (slot, u64::from_str_radix(func, 16).ok()),
                None => (s.as_str(), Some(0)),
            };
            let slot = slot
                .strip_prefix("0x")
                .or_else(|| slot.strip_prefix("0X"))
                .unwrap_or(slot);
            (u64::from_str_radix(slot, 16).ok(), func)
        }
        _ => return bad(),
    };
    match (slot, func) {
        (Some(slot), Some(0)) if (1..32).contains(&slot) => Ok(slot as u8),
        (Some(_), Some(0)) => err("PCI slot must be in 1..=31 (slot 0 is the host bridge)"),
        (Some(_), Some(_)) => err("multifunction devices are not supported (function must be 0)"),
        _ => bad(),
    }
}

/// What a live device needs from the VM.
pub struct DeviceEnv<'a> {
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
    /// MSI routing.
    pub router: &'a Arc<MsiRouter>,
    /// BAR mappings.
    pub bars: &'a Arc<PciBars>,
    /// Where BARs are placed.
    pub window: std::ops::Range<u64>,
    /// The request workers.
    pub workers: &'a Arc<WorkerPool>,
    /// Told about requests the node failed.
    pub on_error: Option<IoErrorReporter>,
    /// Told when the device fails (a request handler panicked, or the
    /// driver broke the virtqueue protocol).
    pub on_fault: Option<FaultReporter>,
}

/// A `virtio-blk-pci` device attached to a slot, serving its node.
pub struct VirtioBlkPci {
    /// Properties it was created with.
    pub props: BlkProps,
    /// Its PCI slot.
    pub slot: u8,
    /// The PCI function (for the bus).
    pub pci: Arc<Mutex<VirtioPciDevice>>,
    bars: Arc<PciBars>,
    queues: Arc<VirtioQueues>,
    _vectors: Vec<Arc<MsiVector>>,
}

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A property is wrong.
    #[error(transparent)]
    Property(#[from] PropertyError),
    /// The virtio device refused its configuration.
    #[error(transparent)]
    Virtio(#[from] devices::virtio::VirtioError),
    /// MSI set-up.
    #[error(transparent)]
    Msi(#[from] crate::vstate::msi::MsiError),
    /// BAR placement.
    #[error(transparent)]
    Bar(#[from] crate::device_manager::pci_bars::BarError),
}

impl VirtioBlkPci {
    /// Creates the device over `node` at `slot` and maps its BAR; the caller
    /// puts [`VirtioBlkPci::pci`] on the PCI bus.
    pub fn create(
        props: BlkProps,
        slot: u8,
        node: NodeRef,
        mut env: DeviceEnv<'_>,
    ) -> Result<VirtioBlkPci, DeviceError> {
        let config = props.config_for(&*node);
        let mut device = VirtioBlock::new(node, config.clone())?;
        if let Some(report) = env.on_error.take() {
            device = device.with_error_reporter(report);
        }
        let device = Arc::new(device);
        let nq = config.num_queues;
        let vectors = (0..=nq)
            .map(|_| env.router.allocate())
            .collect::<Result<Vec<_>, _>>()?;
        let interrupts: Vec<Arc<dyn Interrupt>> = vectors
            .iter()
            .map(|v| v.clone() as Arc<dyn Interrupt>)
            .collect();
        let bar = env.bars.allocate(env.window.clone(), BAR_SIZE)?;
        let label = props.id.clone().unwrap_or_else(|| format!("slot{slot}"));
        let pci = VirtioPciDevice::new(
            device,
            env.memory.clone(),
            interrupts,
            bar,
            env.workers,
            &format!("io-{label}"),
        )?;
        if let Some(report) = env.on_fault.take() {
            pci.set_fault_reporter(report);
        }
        let queues = pci.queues();
        let pci = Arc::new(Mutex::new(pci));
        let doorbells = (0..nq)
            .filter_map(|q| {
                Some(Doorbell {
                    offset: VirtioPciDevice::notify_offset(q),
                    evt: queues.kick_eventfd(usize::from(q))?,
                })
            })
            .collect();
        let shared: SharedDevice = pci.clone();
        if let Err(e) = env.bars.map(slot, bar, BAR_SIZE, shared, doorbells) {
            queues.shutdown();
            return Err(e.into());
        }
        Ok(VirtioBlkPci {
            props,
            slot,
            pci,
            bars: env.bars.clone(),
            queues,
            _vectors: vectors,
        })
    }
}

impl VirtioBlkPci {
    /// Takes the BAR and its doorbells off the bus (the guest no longer
    /// reaches the device); idempotent.
    pub fn unmap(&self) {
        self.bars.unmap(self.slot);
    }
}

impl Drop for VirtioBlkPci {
    fn drop(&mut self) {
        // Doorbells first, so no new work arrives; then the queue threads
        // stop and the requests in flight finish, after which nothing can
        // reach the node; the vectors go last.
        self.bars.unmap(self.slot);
        self.queues.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A node that only has a block size.
    struct Sized(u64);

    impl block::BlockNode for Sized {
        fn driver(&self) -> &'static str {
            "test"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            true
        }
        fn block_size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> block::Result<()> {
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> block::Result<()> {
            Ok(())
        }
        fn flush(&self) -> block::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> block::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> block::Result<()> {
            Ok(())
        }
    }

    /// Without `logical_block_size` the guest sees the drive's block size
    /// (a LUKS2 volume's 4096-byte sectors); a given one is kept.
    #[test]
    fn block_size_follows_the_drive_unless_given() {
        let plain = parse(json!({"driver": "virtio-blk-pci", "drive": "d"})).unwrap();
        let c = plain.config_for(&Sized(4096));
        assert_eq!((c.logical_block_size, c.physical_block_size), (4096, 4096));
        let c = plain.config_for(&Sized(512));
        assert_eq!((c.logical_block_size, c.physical_block_size), (512, 512));
        let given =
            parse(json!({"driver": "virtio-blk-pci", "drive": "d", "logical_block_size": 512}))
                .unwrap();
        let c = given.config_for(&Sized(4096));
        assert_eq!(c.logical_block_size, 512);
    }

    fn parse(v: Value) -> Result<BlkProps, PropertyError> {
        BlkProps::parse(v.as_object().expect("object"), 2)
    }

    #[test]
    fn libvirt_arguments() {
        let p = parse(
            json!({"driver": "virtio-blk-pci", "drive": "libvirt-3-format",
            "id": "virtio-disk2", "bus": "pci.0", "addr": "0x5", "bootindex": 1}),
        )
        .expect("parse");
        assert_eq!(p.drive, "libvirt-3-format");
        assert_eq!(p.id.as_deref(), Some("virtio-disk2"));
        assert_eq!(p.slot, Some(5));
        assert_eq!(p.config.num_queues, 2, "one queue per vCPU by default");
        assert!(p.config.discard && p.config.write_zeroes);
    }

    #[test]
    fn properties_as_strings_from_the_dotted_form() {
        let p = parse(
            json!({"driver": "virtio-blk-pci", "drive": "d", "num-queues": "4",
            "queue-size": "128", "logical_block_size": "4096", "physical_block_size": "4096",
            "discard": "off", "write-zeroes": "on", "serial": "SN1", "addr": "07.0"}),
        )
        .expect("parse");
        assert_eq!(p.config.num_queues, 4);
        assert_eq!(p.config.queue_size, 128);
        assert_eq!(p.config.logical_block_size, 4096);
        assert!(!p.config.discard && p.config.write_zeroes);
        assert_eq!(p.config.serial, "SN1");
        assert_eq!(p.slot, Some(7));
    }

    /// The limits are the device's (one check, in the devices crate), the
    /// words QEMU's; an unknown property is named before anything is read.
    #[test]
    fn limits_are_the_devices() {
        let e = |v| parse(v).expect_err("must fail").0;
        let d = |extra: Value| {
            let mut v = json!({"driver": "virtio-blk-pci", "drive": "d"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(MAX_QUEUES, 511);
        let p = parse(d(json!({"num-queues": 511, "queue-size": 1024}))).expect("parse");
        assert_eq!((p.config.num_queues, p.config.queue_size), (511, 1024));
        assert_eq!(
            e(d(json!({"num-queues": 512}))),
            "Property virtio-blk-pci.num-queues doesn't take value 512 (minimum: 1, maximum: 511)"
        );
        assert_eq!(
            e(d(json!({"queue-size": 2048}))),
            "invalid queue-size property (2048), must be a power of 2 (max 1024)"
        );
        assert_eq!(
            e(d(json!({"queue-size": 2}))),
            "invalid queue-size property (2), must be > 2"
        );
        assert_eq!(
            e(d(json!({"num-queues": "x", "num-queus": 2}))),
            "Property 'virtio-blk-pci.num-queus' not found"
        );
        assert_eq!(
            e(d(json!({"logical_block_size": 65536}))),
            "Property virtio-blk-pci.logical_block_size doesn't take value 65536 (minimum: 512, maximum: 32768)"
        );
    }

    #[test]
    fn errors_in_qemu_words() {
        let e = |v| parse(v).expect_err("must fail").0;
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "bogus": 1})),
            "Property 'virtio-blk-pci.bogus' not found"
        );
        assert_eq!(
            e(json!({"driver": "e1000", "drive": "d"})),
            "'e1000' is not a valid device model name"
        );
        assert_eq!(e(json!({"drive": "d"})), "Parameter 'driver' is missing");
        assert_eq!(
            e(json!({"driver": "virtio-blk-pci"})),
            "drive property not set"
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "queue-size": 100}))
                .contains("power of 2")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "num-queues": 0}))
                .contains("minimum: 1")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "addr": "0x0"})).contains("slot 0")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "addr": "0x20"})).contains("1..=31")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "addr": "3.1"}))
                .contains("multifunction")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "id": "1x"})).contains("identifier")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "serial": "x".repeat(21)}))
                .contains("20 bytes")
        );
        assert!(
            e(json!({"driver": "virtio-blk-pci", "drive": "d", "bus": "pci.1"}))
                .contains("not found")
        );
        assert!(e(json!({"driver": "virtio-blk-pci", "drive": 3})).contains("expected: string"));
    }
}
