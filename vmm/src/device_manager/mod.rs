//! The VM's configurable half: secrets, the block graph and the PCI disks
//! over it. The config file (cold plug, before boot) and QMP (hot plug while
//! the guest runs) go through the same methods.
//!
//! Guest ejects arrive on the `hotplug` thread ([`hotplug`]), never on a vCPU.
//! Lock order: [`Machine`]'s state before the PCI root, before a PCI device;
//! the state lock is never held while notifying the guest or flushing.

pub mod debug_exit;
mod hotplug;
pub mod pci_bars;
pub mod virtio_blk;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde_json::{json, Map, Value};

use block::blockdev::{BackingFiles, OpenContext};
use block::{BlockError, BlockGraph, ErrorKind, SecretStore};
use devices::acpi::Ged;
use devices::pci::{PciRoot, SharedPciDevice};
use devices::virtio::block::IoOperation;
use devices::{Bus, WorkerPool};

use crate::arch::x86_64::layout;
use crate::control::queries;
use crate::device_manager::pci_bars::PciBars;
use crate::device_manager::virtio_blk::{BlkProps, DeviceEnv, DeviceError, VirtioBlkPci};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::msi::MsiRouter;
use crate::vstate::vm::Vm;

/// How a control request failed: a kind ([`ControlError::kind`]) plus the
/// message QEMU gives; QMP maps [`ControlError::DeviceNotFound`] to its
/// `DeviceNotFound` class and everything else to `GenericError`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The block layer refused (a node, a secret, a permission conflict).
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A device could not be created (a property, MSI-X, its BAR).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A request QEMU would refuse in these words (duplicate id, bad drive).
    #[error("{0}")]
    Invalid(String),
    /// A slot, device or object is busy (all slots taken, unplug pending).
    #[error("{0}")]
    Busy(String),
    /// Not possible on this machine (hot plug before it is enabled).
    #[error("{0}")]
    NotSupported(String),
    /// No device with that id (`DeviceNotFound`).
    #[error("{0}")]
    DeviceNotFound(String),
    /// No object with that id.
    #[error("{0}")]
    ObjectNotFound(String),
    /// The ACPI power button could not be pressed (its interrupt).
    #[error("pressing the power button: {0}")]
    PowerButton(#[source] std::io::Error),
}

/// Two errors are equal when they are the same variant with the same message
/// (sources are not comparable).
impl PartialEq for ControlError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl ControlError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Block(e) => e.kind(),
            Self::Device(DeviceError::Property(_)) | Self::Invalid(_) => ErrorKind::InvalidArgument,
            Self::Device(_) | Self::PowerButton(_) => ErrorKind::Internal,
            Self::Busy(_) => ErrorKind::InUse,
            Self::NotSupported(_) => ErrorKind::NotSupported,
            Self::DeviceNotFound(_) | Self::ObjectNotFound(_) => ErrorKind::NotFound,
        }
    }
}

/// Sends a QMP event to the sink, if there is one (the lock is not held
/// while the sink runs).
fn emit_to(events: &Mutex<Option<EventSink>>, event: &str, data: Value) {
    let sink = lock(events).clone();
    if let Some(sink) = sink {
        sink(event, data);
    }
}

/// Tells the guest about slots that change (ACPI PCI hotplug).
pub trait HotplugNotifier: Send + Sync {
    /// A device was added at `slot`: the guest should scan it.
    fn plugged(&self, slot: u8);
    /// The operator asked to remove `slot`'s device: the guest should let
    /// go of it and eject it.
    fn unplug_requested(&self, slot: u8);
}

/// Receives the machine's QMP events (`DEVICE_DELETED`, ...).
pub type EventSink = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// What the machine's devices are built from.
pub struct MachineParams {
    /// vCPUs (default `num-queues`).
    pub cpus: u8,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// MSI routing.
    pub router: Arc<MsiRouter>,
    /// BAR mappings.
    pub bars: Arc<PciBars>,
    /// PCI bus 0.
    pub pci_root: Arc<Mutex<PciRoot>>,
    /// Where device BARs are placed.
    pub window: std::ops::Range<u64>,
    /// The request workers every disk's queues share.
    pub workers: Arc<WorkerPool>,
}

impl MachineParams {
    /// The parameters that put a machine on `vm`: its vCPU count, RAM, MSI
    /// routes, PCI root and the 64-bit MMIO window above its RAM, with BARs
    /// mapped onto its MMIO bus; requests run on `workers`.
    pub fn for_vm(vm: &Vm, workers: Arc<WorkerPool>) -> Self {
        MachineParams {
            cpus: vm.cpus(),
            memory: vm.memory().clone(),
            router: vm.msi_router().clone(),
            bars: PciBars::new(vm.fd().clone(), vm.mmio_bus().clone()),
            pci_root: vm.pci_root().clone(),
            window: layout::mmio64_window(vm.memory_size()),
            workers,
        }
    }
}

struct Disk {
    device: VirtioBlkPci,
    /// The guest was asked to eject it.
    unplugging: bool,
}

impl Disk {
    fn id(&self) -> Option<&str> {
        self.device.props.id.as_deref()
    }

    /// The name the block graph knows the device's use of its node by.
    fn user(&self) -> String {
        user_name(&self.device.props, self.device.slot)
    }
}

/// The device's QOM path as QEMU names the user of a node in its errors.
fn user_name(props: &BlkProps, slot: u8) -> String {
    match &props.id {
        Some(id) => format!("/machine/peripheral/{id}/virtio-backend"),
        None => format!("/machine/peripheral-anon/device[{slot}]/virtio-backend"),
    }
}

#[derive(Default)]
struct State {
    secrets: SecretStore,
    graph: BlockGraph,
    disks: Vec<Disk>,
}

/// Secrets, block nodes and disks of a running (or booting) VM.
pub struct Machine {
    params: MachineParams,
    state: Mutex<State>,
    /// Held by `blockdev-add` while it opens nodes outside `state`: one opens at a time.
    opening: Mutex<()>,
    hotplug: Mutex<Option<Arc<dyn HotplugNotifier>>>,
    teardown: Mutex<Option<hotplug::Teardown>>,
    events: Arc<Mutex<Option<EventSink>>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Machine {
    /// A machine with no secrets, nodes or disks; BARs the guest moves are
    /// remapped by `params.bars`.
    pub fn new(params: MachineParams) -> Arc<Machine> {
        let bars = params.bars.clone();
        lock(&params.pci_root)
            .set_bar_observer(Box::new(move |slot, old, new| bars.moved(slot, old, new)));
        Arc::new(Machine {
            params,
            state: Mutex::new(State::default()),
            opening: Mutex::new(()),
            hotplug: Mutex::new(None),
            teardown: Mutex::new(None),
            events: Arc::default(),
        })
    }

    /// Enables ACPI PCI hotplug: places the hotplug registers on `mmio`,
    /// announces disks added from now on through `ged`, and tears down the
    /// disks the guest ejects on the `hotplug` thread.
    pub fn enable_hotplug(
        self: &Arc<Self>,
        mmio: &RwLock<Bus>,
        ged: Arc<Mutex<Ged>>,
    ) -> std::io::Result<()> {
        let (notifier, teardown) = hotplug::start(Arc::downgrade(self), mmio, ged)?;
        *lock(&self.teardown) = Some(teardown);
        self.set_hotplug(notifier);
        Ok(())
    }

    /// Announces disks added from now on through `notifier`, and lets
    /// `device_del` ask the guest to eject ([`Machine::enable_hotplug`] uses
    /// ACPI; tests record).
    pub fn set_hotplug(&self, notifier: Arc<dyn HotplugNotifier>) {
        *lock(&self.hotplug) = Some(notifier);
    }

    /// Where events go (the QMP server).
    pub fn set_event_sink(&self, sink: EventSink) {
        *lock(&self.events) = Some(sink);
    }

    fn emit(&self, event: &str, data: Value) {
        emit_to(&self.events, event, data);
    }

    /// `object-add`: a secret. `path` prefixes errors (`objects[0]`);
    /// relative file names resolve against `base_dir`.
    pub fn object_add(
        &self,
        path: &str,
        args: Map<String, Value>,
        base_dir: Option<&Path>,
    ) -> Result<(), ControlError> {
        lock(&self.state)
            .secrets
            .add(path, Value::Object(args), base_dir)
            .map(drop)
            .map_err(|e| ControlError::Block(e.at(path)))
    }

    /// `object-del`.
    pub fn object_del(&self, id: &str) -> Result<(), ControlError> {
        lock(&self.state)
            .secrets
            .remove(id)
            .map_err(|_| ControlError::ObjectNotFound(format!("object '{id}' not found")))
    }

    /// `blockdev-add`; see [`Machine::object_add`] for `path` and `base_dir`.
    pub fn blockdev_add(
        &self,
        path: &str,
        args: &Map<String, Value>,
        base_dir: Option<&Path>,
    ) -> Result<(), ControlError> {
        // Opening may take long (a LUKS unlock runs its KDF; a file may be slow), so
        // it runs on a copy of the graph with no lock held that the vCPUs, the disks
        // or other QMP commands need; only blockdev-adds wait for each other.
        let _one_at_a_time = lock(&self.opening);
        let (mut staging, secrets) = {
            let state = lock(&self.state);
            (state.graph.stage(), state.secrets.clone())
        };
        let ctx = OpenContext {
            secrets: &secrets,
            base_dir,
            no_io: false,
            read_only: false,
            backing_files: BackingFiles::Contained,
            legacy_aes: false,
        };
        staging
            .add(path, Value::Object(args.clone()), &ctx, false)
            .map_err(ControlError::Block)?;
        lock(&self.state)
            .graph
            .merge(staging)
            .map_err(|e| ControlError::Block(e.at(path)))
    }

    /// The work of a `blockdev-create` job: creates what `options` say on the nodes
    /// they name (looked up now, so nodes added after the job started count), with the
    /// secrets known now.
    pub fn blockdev_create(
        &self,
        options: &block::create::CreateOptions,
    ) -> Result<(), block::create::CreateError> {
        let (nodes, secrets) = {
            let state = lock(&self.state);
            let nodes: Vec<(String, block::NodeRef)> = state
                .graph
                .names()
                .filter_map(|n| state.graph.get(n).map(|node| (n.to_string(), node)))
                .collect();
            (nodes, state.secrets.clone())
        };
        let lookup = |name: &str| {
            nodes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, node)| Arc::clone(node))
        };
        block::create::run(options, &lookup, &secrets)
    }

    /// `blockdev-del`: refused while a device or another node uses the node.
    pub fn blockdev_del(&self, node_name: &str) -> Result<(), ControlError> {
        let mut state = lock(&self.state);
        let node = state.graph.get(node_name);
        state.graph.remove(node_name).map_err(ControlError::Block)?;
        if let Some(node) = node {
            // Write back caches (qcow2 metadata) before the files close.
            if let Err(e) = node.flush() {
                eprintln!("cryptvm: flushing node '{node_name}' on blockdev-del: {e}");
            }
        }
        Ok(())
    }

    /// `device_add` (a `virtio-blk-pci` disk, its properties parsed with
    /// [`BlkProps::parse`]). Before boot the guest finds it while enumerating;
    /// afterwards it is hot-plugged and announced.
    pub fn device_add(&self, props: BlkProps) -> Result<(), ControlError> {
        let slot = {
            let mut state = lock(&self.state);
            self.create_disk(&mut state, props)?
        };
        let notifier = lock(&self.hotplug).clone();
        if let Some(n) = notifier {
            n.plugged(slot);
        }
        Ok(())
    }

    fn create_disk(&self, state: &mut State, props: BlkProps) -> Result<u8, ControlError> {
        if let Some(id) = &props.id {
            if state.disks.iter().any(|d| d.id() == Some(id)) {
                return Err(ControlError::Invalid(format!("Duplicate device ID '{id}'")));
            }
        }
        let root = &self.params.pci_root;
        let slot = match props.slot {
            Some(slot) => {
                if lock(root).device(slot).is_some() {
                    return Err(ControlError::Busy(format!(
                        "PCI: slot {slot} function 0 not available for virtio-blk-pci, in use"
                    )));
                }
                slot
            }
            None => lock(root).free_slot().map_err(|_| {
                ControlError::Busy(
                    "PCI: no slot/function available for virtio-blk-pci, all in use".into(),
                )
            })?,
        };
        let user = user_name(&props, slot);
        let drive = props.drive.clone();
        if state.graph.get(&drive).is_none() {
            return Err(ControlError::Invalid(format!(
                "Property 'virtio-blk-device.drive' can't find value '{drive}'"
            )));
        }
        let node = state
            .graph
            .attach(&drive, &user)
            .map_err(ControlError::Block)?;
        let events = self.events.clone();
        let node_name = drive.clone();
        let fault_events = self.events.clone();
        let fault_node = drive.clone();
        let env = DeviceEnv {
            memory: &self.params.memory,
            router: &self.params.router,
            bars: &self.params.bars,
            window: self.params.window.clone(),
            workers: &self.params.workers,
            on_error: Some(Box::new(move |op, error| {
                let operation = match op {
                    IoOperation::Read => "read",
                    IoOperation::Write => "write",
                };
                emit_to(
                    &events,
                    "BLOCK_IO_ERROR",
                    json!({"device": "", "node-name": node_name, "operation": operation,
                           "action": "report", "nospace": error.is_no_space(),
                           "reason": error.to_string()}),
                );
            })),
            on_fault: Some(Box::new(move |what| {
                eprintln!("cryptvm: {what}");
                emit_to(
                    &fault_events,
                    "BLOCK_IO_ERROR",
                    json!({"device": "", "node-name": fault_node, "operation": "write",
                           "action": "report", "nospace": false, "reason": what}),
                );
            })),
        };
        let device = match VirtioBlkPci::create(props, slot, node, env) {
            Ok(d) => d,
            Err(e) => {
                state.graph.detach(&drive, &user);
                return Err(e.into());
            }
        };
        let pci: SharedPciDevice = device.pci.clone();
        if let Err(e) = lock(root).add_device(slot, pci) {
            state.graph.detach(&drive, &user);
            return Err(ControlError::Busy(e.to_string()));
        }
        state.disks.push(Disk {
            device,
            unplugging: false,
        });
        Ok(slot)
    }

    /// `device_del`: asks the guest to eject the device; it is removed (and
    /// `DEVICE_DELETED` sent) when the guest does.
    pub fn device_del(&self, id: &str) -> Result<(), ControlError> {
        let notifier = lock(&self.hotplug).clone().ok_or_else(|| {
            ControlError::NotSupported("Bus 'pci.0' does not support hotplugging".into())
        })?;
        let slot = {
            let mut state = lock(&self.state);
            let disk = state
                .disks
                .iter_mut()
                .find(|d| d.id() == Some(id))
                .ok_or_else(|| ControlError::DeviceNotFound(format!("Device '{id}' not found")))?;
            if disk.unplugging {
                return Err(ControlError::Busy(format!(
                    "Device {id} is already in the process of unplug"
                )));
            }
            disk.unplugging = true;
            disk.device.slot
        };
        notifier.unplug_requested(slot);
        Ok(())
    }

    /// The guest ejected `slot`: release the device and its node, and tell
    /// the QMP clients. Runs on the `hotplug` thread; the PCI root and the
    /// MMIO bus (which vCPUs use) are held only to unmap the device.
    pub fn eject(&self, slot: u8) {
        let disk = {
            let mut state = lock(&self.state);
            let Some(i) = state
                .disks
                .iter()
                .position(|d| d.device.slot == slot && d.unplugging)
            else {
                return;
            };
            let disk = state.disks.remove(i);
            lock(&self.params.pci_root).remove_device(slot);
            // The slot is free again only once its BAR and doorbells are gone.
            disk.device.unmap();
            disk
        };
        let user = disk.user();
        let id = disk.id().map(str::to_string);
        let drive = disk.device.props.drive.clone();
        // Stops the queue threads and waits for the requests in flight,
        // without holding the state lock (QMP goes on meanwhile); the node
        // stays attached, so nobody can delete it until no thread can reach
        // it and it is written back.
        drop(disk);
        let node = lock(&self.state).graph.get(&drive);
        if let Some(node) = node {
            if let Err(e) = node.flush() {
                eprintln!("cryptvm: flushing '{drive}' after unplug: {e}");
            }
        }
        lock(&self.state).graph.detach(&drive, &user);
        // As QEMU: the virtio backend first, then the device.
        if let Some(id) = id {
            self.emit("DEVICE_DELETED", json!({ "path": user }));
            let path = format!("/machine/peripheral/{id}");
            self.emit("DEVICE_DELETED", json!({"device": id, "path": path}));
        }
    }

    /// Stops every disk and writes back every node (the VM is ending).
    pub fn shutdown(&self) {
        let teardown = lock(&self.teardown).take();
        if let Some(teardown) = teardown {
            teardown.stop();
        }
        let mut state = lock(&self.state);
        state.disks.clear();
        for name in state.graph.names() {
            if let Some(node) = state.graph.get(name) {
                if let Err(e) = node.flush() {
                    eprintln!("cryptvm: flushing node '{name}': {e}");
                }
            }
        }
    }

    /// `query-block`.
    pub fn query_block(&self) -> Value {
        let state = lock(&self.state);
        let disks: Vec<(String, String)> = state
            .disks
            .iter()
            .map(|d| (d.user(), d.device.props.drive.clone()))
            .collect();
        queries::block(&state.graph, &disks)
    }

    /// `query-named-block-nodes`.
    pub fn query_named_block_nodes(&self, flat: bool) -> Value {
        queries::named_block_nodes(&lock(&self.state).graph, flat)
    }

    /// The vCPUs: a disk's default `num-queues` ([`BlkProps::parse`]).
    pub fn vcpus(&self) -> u8 {
        self.params.cpus
    }

    /// `query-pci`.
    pub fn query_pci(&self) -> Value {
        let ids: Vec<(u8, Option<String>)> = lock(&self.state)
            .disks
            .iter()
            .map(|d| (d.device.slot, d.device.props.id.clone()))
            .collect();
        let root = lock(&self.params.pci_root);
        queries::pci(&root, |slot| {
            ids.iter()
                .find(|(s, _)| *s == slot)
                .and_then(|(_, id)| id.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::BlockNode;
    use devices::virtio::VirtioPciDevice;
    use serde_json::json;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Recorder {
        plugged: Mutex<Vec<u8>>,
        unplug: Mutex<Vec<u8>>,
    }

    impl HotplugNotifier for Recorder {
        fn plugged(&self, slot: u8) {
            lock(&self.plugged).push(slot);
        }
        fn unplug_requested(&self, slot: u8) {
            lock(&self.unplug).push(slot);
        }
    }

    struct Rig {
        machine: Arc<Machine>,
        hotplug: Arc<Recorder>,
        events: Arc<Mutex<Vec<(String, Value)>>>,
        mmio: Arc<RwLock<Bus>>,
        _dir: tempfile::TempDir,
        disk: String,
    }

    /// The events `machine` sends from now on, as (name, data).
    fn record_events(machine: &Machine) -> Arc<Mutex<Vec<(String, Value)>>> {
        let events: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let seen = events.clone();
        machine.set_event_sink(Arc::new(move |e, d| lock(&seen).push((e.to_string(), d))));
        events
    }

    /// A machine on a real KVM VM (no vCPUs run), or None without KVM.
    fn rig() -> Option<Rig> {
        let kvm = crate::vstate::vm::open_kvm().ok()?;
        let vm = Arc::new(kvm.create_vm().expect("VM"));
        vm.create_irq_chip().expect("irqchip");
        let memory = crate::vstate::memory::create_guest_memory(16 << 20).expect("memory");
        let mmio = Arc::new(RwLock::new(Bus::new()));
        let machine = Machine::new(MachineParams {
            cpus: 2,
            memory,
            router: MsiRouter::new(vm.clone()),
            bars: PciBars::new(vm, mmio.clone()),
            pci_root: Arc::new(Mutex::new(PciRoot::new())),
            window: 1 << 32..(1 << 32) + (1 << 30),
            workers: WorkerPool::new(4, "io-test").expect("workers"),
        });
        let hotplug = Arc::new(Recorder::default());
        machine.set_hotplug(hotplug.clone());
        let events = record_events(&machine);
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("d.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
        Some(Rig {
            machine,
            hotplug,
            events,
            mmio,
            _dir: dir,
            disk: disk.to_string_lossy().into_owned(),
        })
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    /// `device_add` as QMP gives it: the properties parsed, then the disk added.
    fn add_disk(m: &Machine, v: Value) -> Result<(), ControlError> {
        let props = BlkProps::parse(&args(v), m.vcpus()).map_err(DeviceError::from)?;
        m.device_add(props)
    }

    #[test]
    fn hotplug_lifecycle_and_qemu_errors() {
        let Some(r) = rig() else {
            return; // no KVM here; the e2e tests cover this in a guest
        };
        let m = &r.machine;
        m.blockdev_add(
            "",
            &args(json!({"node-name": "f", "driver": "file", "filename": r.disk})),
            None,
        )
        .expect("blockdev-add");
        let disk = json!({"driver": "virtio-blk-pci", "drive": "f", "id": "vd0", "num-queues": 2});
        add_disk(m, disk.clone()).expect("device_add");
        assert_eq!(
            *lock(&r.hotplug.plugged),
            [1],
            "the guest is told about slot 1"
        );
        let pci = m.query_pci();
        assert_eq!(pci[0]["devices"][1]["qdev_id"], "vd0");
        assert_eq!(pci[0]["devices"][1]["id"]["device"], 0x1042);
        let bar = pci[0]["devices"][1]["regions"][0]["address"]
            .as_u64()
            .expect("BAR");
        assert!(!r.mmio.read().unwrap().is_free(bar, 1), "BAR mapped");
        assert_eq!(m.query_block()[0]["inserted"]["node-name"], "f");

        // QEMU's refusals.
        let generic = |e: ControlError| match e {
            ControlError::DeviceNotFound(_) => panic!("expected GenericError, got {e:?}"),
            other => other.to_string(),
        };
        let dup = generic(add_disk(m, disk.clone()).unwrap_err());
        assert_eq!(dup, "Duplicate device ID 'vd0'");
        let mut other = disk.clone();
        other["id"] = json!("vd1");
        let busy = generic(add_disk(m, other).unwrap_err());
        assert_eq!(
            busy,
            "Permission conflict on node 'f': permissions 'write' are both required by block \
             device '/machine/peripheral/vd0/virtio-backend' (uses node 'f' as 'root' child) \
             and unshared by block device '/machine/peripheral/vd1/virtio-backend' (uses node \
             'f' as 'root' child)."
        );
        let del = generic(m.blockdev_del("f").unwrap_err());
        assert_eq!(del, "Node f is in use");
        assert_eq!(
            m.device_del("nope"),
            Err(ControlError::DeviceNotFound(
                "Device 'nope' not found".into()
            ))
        );

        // Unplug waits for the guest's eject.
        m.device_del("vd0").expect("device_del");
        assert_eq!(*lock(&r.hotplug.unplug), [1]);
        let again = generic(m.device_del("vd0").unwrap_err());
        assert_eq!(again, "Device vd0 is already in the process of unplug");
        assert!(
            m.blockdev_del("f").is_err(),
            "node busy until the guest ejects"
        );
        m.eject(2); // a slot nobody asked about: ignored
        assert!(lock(&r.events).is_empty());
        m.eject(1);
        let events = lock(&r.events).clone();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1].0, "DEVICE_DELETED");
        assert_eq!(
            events[1].1,
            json!({"device": "vd0", "path": "/machine/peripheral/vd0"})
        );
        assert!(r.mmio.read().unwrap().is_free(bar, 1), "BAR unmapped");
        assert_eq!(
            m.query_pci()[0]["devices"].as_array().map(Vec::len),
            Some(1)
        );
        m.blockdev_del("f").expect("blockdev-del after eject");

        // Re-adding the same stack works.
        m.blockdev_add(
            "",
            &args(json!({"node-name": "f", "driver": "file", "filename": r.disk})),
            None,
        )
        .expect("blockdev-add again");
        add_disk(m, disk).expect("device_add again");
        m.shutdown();
    }

    #[test]
    fn the_bar_serves_the_common_configuration() {
        let Some(r) = rig() else {
            return;
        };
        let m = &r.machine;
        m.blockdev_add(
            "",
            &args(json!({"node-name": "f", "driver": "file", "filename": r.disk})),
            None,
        )
        .expect("blockdev-add");
        add_disk(
            m,
            json!({"driver": "virtio-blk-pci", "drive": "f", "addr": 7}),
        )
        .expect("device_add");
        let bar = m.query_pci()[0]["devices"][1]["regions"][0]["address"]
            .as_u64()
            .expect("BAR");
        let (offset, dev) = r.mmio.read().unwrap().resolve(bar + 0x12).expect("mapped");
        let mut nq = [0u8; 2];
        devices::lock_device(&dev).read(offset, &mut nq);
        assert_eq!(
            u16::from_le_bytes(nq),
            2,
            "num_queues defaults to the vCPUs"
        );
    }

    /// A 1 MiB block node whose writes have a bug (panic) or are slow (50 ms),
    /// or whose flush is slow.
    enum TestNode {
        Panics,
        Slow,
        SlowFlush(Arc<FlushProbe>),
        /// Writes fail as on a full host disk (ENOSPC).
        Full,
    }

    /// What a [`TestNode::SlowFlush`] saw: when its 1.5 s flush ran, and on
    /// which thread.
    #[derive(Default)]
    struct FlushProbe {
        started: std::sync::atomic::AtomicBool,
        done: std::sync::atomic::AtomicBool,
        thread: Mutex<Option<String>>,
    }

    impl BlockNode for TestNode {
        fn driver(&self) -> &'static str {
            "test"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> block::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _offset: u64, _buf: &[u8]) -> block::Result<()> {
            match self {
                TestNode::Panics => panic!("injected fault in the block layer"),
                TestNode::Slow => std::thread::sleep(Duration::from_millis(50)),
                TestNode::SlowFlush(_) => {}
                TestNode::Full => {
                    return Err(BlockError::io(
                        "writing 'full.img'",
                        std::io::Error::from_raw_os_error(libc::ENOSPC),
                    ))
                }
            }
            Ok(())
        }
        fn flush(&self) -> block::Result<()> {
            if let TestNode::SlowFlush(probe) = self {
                use std::sync::atomic::Ordering::SeqCst;
                *lock(&probe.thread) = std::thread::current().name().map(str::to_string);
                probe.started.store(true, SeqCst);
                std::thread::sleep(Duration::from_millis(1500));
                probe.done.store(true, SeqCst);
            }
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> block::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> block::Result<()> {
            Ok(())
        }
    }

    const QSIZE: u16 = 128;

    /// The guest side of one disk's queue 0, through the MMIO bus as a vCPU
    /// reaches it (no MSI-X: completions are read off the used ring).
    struct BusDriver {
        mmio: Arc<RwLock<Bus>>,
        mem: GuestMemoryMmap,
        bar: u64,
        base: u64,
        avail_idx: u16,
    }

    impl BusDriver {
        fn new(r: &Rig, id: &str, base: u64) -> BusDriver {
            let pci = r.machine.query_pci();
            let dev = pci[0]["devices"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["qdev_id"] == id))
                .expect("device in query-pci");
            let bar = dev["regions"][0]["address"].as_u64().expect("BAR");
            let d = BusDriver {
                mmio: r.mmio.clone(),
                mem: r.machine.params.memory.clone(),
                bar,
                base,
                avail_idx: 0,
            };
            for off in (0..0x3000).step_by(8) {
                d.mem.write_obj(0u64, GuestAddress(base + off)).unwrap();
            }
            d.bar_w(0x14, 0, 1);
            d.bar_w(0x14, 3, 1);
            for sel in 0..2u64 {
                d.bar_w(0, sel, 4);
                let f = d.bar_r(4, 4);
                d.bar_w(8, sel, 4);
                d.bar_w(0xc, f, 4);
            }
            d.bar_w(0x14, 0xb, 1);
            d.bar_w(0x16, 0, 2);
            d.bar_w(0x18, u64::from(QSIZE), 2);
            d.bar_w(0x20, base, 8);
            d.bar_w(0x28, base + 0x1000, 8);
            d.bar_w(0x30, base + 0x2000, 8);
            d.bar_w(0x1c, 1, 2);
            d.bar_w(0x14, 0xf, 1);
            assert_eq!(d.bar_r(0x14, 1), 0xf, "{id}: DRIVER_OK");
            d
        }

        fn bar_w(&self, off: u64, v: u64, len: usize) {
            let (o, dev) = self
                .mmio
                .read()
                .unwrap()
                .resolve(self.bar + off)
                .expect("BAR");
            devices::lock_device(&dev).write(o, &v.to_le_bytes()[..len]);
        }

        fn bar_r(&self, off: u64, len: usize) -> u64 {
            let (o, dev) = self
                .mmio
                .read()
                .unwrap()
                .resolve(self.bar + off)
                .expect("BAR");
            let mut d = [0u8; 8];
            devices::lock_device(&dev).read(o, &mut d[..len]);
            u64::from_le_bytes(d)
        }

        fn put_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = self.base + 16 * u64::from(i);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        /// Queues request `k` (< QSIZE / 3): a 4 KiB write (`ty` 1) or read
        /// (`ty` 0) of `data` at sector `sector`; returns its status address.
        fn queue(&mut self, k: u16, ty: u32, sector: u64, data: u64) -> u64 {
            let hdr = self.base + 0x3000 + u64::from(k) * 0x20;
            self.mem.write_obj(ty, GuestAddress(hdr)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(hdr + 0x10))
                .unwrap();
            let h = 3 * k;
            let data_flags = if ty == 0 { 2 } else { 0 };
            self.put_desc(h, hdr, 16, 1, h + 1);
            self.put_desc(h + 1, data, 4096, 1 | data_flags, h + 2);
            self.put_desc(h + 2, hdr + 0x10, 1, 2, 0);
            let avail = self.base + 0x1000;
            let slot = avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            self.mem.write_obj(h, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(avail + 2))
                .unwrap();
            hdr + 0x10
        }

        /// The vCPU's notify write.
        fn notify(&self) {
            self.bar_w(VirtioPciDevice::notify_offset(0), 0, 2);
        }

        fn used(&self) -> u16 {
            self.mem
                .read_obj(GuestAddress(self.base + 0x2000 + 2))
                .unwrap()
        }

        fn wait_used(&self, n: u16) {
            let start = Instant::now();
            while self.used() != n {
                assert!(start.elapsed() < Duration::from_secs(20), "no completion");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn insert(m: &Machine, name: &str, node: block::NodeRef) {
        lock(&m.state)
            .graph
            .insert_node(name, node)
            .expect("insert node");
    }

    /// A rig with `node` as disk `vd0` (one queue of [`QSIZE`]), driven from
    /// guest memory at 1 MiB.
    fn one_disk(name: &str, node: TestNode) -> Option<(Rig, BusDriver)> {
        let r = rig()?;
        insert(&r.machine, name, Arc::new(node));
        add_disk(
            &r.machine,
            json!({"driver": "virtio-blk-pci", "drive": name,
                                      "id": "vd0", "num-queues": 1, "queue-size": QSIZE}),
        )
        .expect("device_add");
        let d = BusDriver::new(&r, "vd0", 0x10_0000);
        Some((r, d))
    }

    /// The injected fault: a request handler panics. The guest gets IOERR and
    /// DEVICE_NEEDS_RESET, QMP gets a BLOCK_IO_ERROR naming the node and why,
    /// and the VMM goes on: QMP queries answer, the other disk reads and
    /// writes.
    #[test]
    fn a_failing_disk_is_reported_and_the_rest_goes_on() {
        let Some(r) = rig() else {
            return;
        };
        let m = &r.machine;
        insert(m, "bad", Arc::new(TestNode::Panics));
        m.blockdev_add(
            "",
            &args(json!({"node-name": "good", "driver": "file", "filename": r.disk})),
            None,
        )
        .expect("blockdev-add");
        for (id, drive) in [("vd0", "bad"), ("vd1", "good")] {
            add_disk(
                m,
                json!({"driver": "virtio-blk-pci", "drive": drive,
                                       "id": id, "num-queues": 1, "queue-size": QSIZE}),
            )
            .expect("device_add");
        }
        let mut bad = BusDriver::new(&r, "vd0", 0x10_0000);
        let mut good = BusDriver::new(&r, "vd1", 0x20_0000);
        let data = 0x40_0000;
        r.machine
            .params
            .memory
            .write_slice(&[0x77u8; 4096], GuestAddress(data))
            .unwrap();

        let status = bad.queue(0, 1, 0, data);
        bad.notify();
        bad.wait_used(1);
        let st: u8 = bad.mem.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(st, 1, "the guest sees IOERR");
        assert!(bad.bar_r(0x14, 1) & 0x40 != 0, "DEVICE_NEEDS_RESET");
        let events = lock(&r.events).clone();
        let report = events
            .iter()
            .find(|(e, d)| e == "BLOCK_IO_ERROR" && d["node-name"] == "bad")
            .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR for the failed disk: {events:?}"));
        let reason = report.1["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("io-vd0")
                && reason.contains("injected fault")
                && reason.contains("reset"),
            "{reason}"
        );

        // QMP goes on, and so does the other disk.
        assert_eq!(m.query_block().as_array().map(Vec::len), Some(2));
        assert_eq!(
            m.query_pci()[0]["devices"].as_array().map(Vec::len),
            Some(3)
        );
        let st = good.queue(0, 1, 8, data);
        good.notify();
        good.wait_used(1);
        assert_eq!(good.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0);
        let on_disk = std::fs::read(&r.disk).expect("disk");
        assert_eq!(&on_disk[4096..8192], &[0x77u8; 4096][..]);
        assert_eq!(good.bar_r(0x14, 1), 0xf, "the other disk is fine");
        m.shutdown();
    }

    /// QMP queries and config reads answer while a guest keeps a queue busy
    /// (40 writes of 50 ms: a 2 s backlog); asserted under 250 ms each.
    #[test]
    fn qmp_answers_while_a_queue_is_busy() {
        let Some((r, mut d)) = one_disk("slow", TestNode::Slow) else {
            return;
        };
        let m = &r.machine;
        for k in 0..20 {
            d.queue(k, 1, u64::from(k) * 8, 0x40_0000);
        }
        d.notify();
        for k in 20..40 {
            d.queue(k, 1, u64::from(k) * 8, 0x40_0000);
            d.notify();
        }
        let mut worst = Duration::ZERO;
        for _ in 0..10 {
            let t = Instant::now();
            assert_eq!(
                m.query_pci()[0]["devices"].as_array().map(Vec::len),
                Some(2)
            );
            assert_eq!(m.query_block()[0]["inserted"]["node-name"], "slow");
            m.query_named_block_nodes(true);
            assert_eq!(d.bar_r(0x18, 2), u64::from(QSIZE), "config read");
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = 40 - d.used();
        eprintln!("worst QMP query + config read {worst:?} with {left} requests still queued");
        assert!(left > 5, "the backlog drained too soon to show anything");
        assert!(worst < Duration::from_millis(250), "QMP waited {worst:?}");
        d.wait_used(40);
        m.shutdown();
    }

    /// Issue 11: a guest's eject is torn down off the vCPU thread. A real
    /// vCPU writes B0EJ for a disk whose flush takes 1.5 s, then counts in
    /// a loop; the count must go on while the flush runs (before, the flush
    /// ran inside the vCPU's MMIO write and the guest stood still).
    #[test]
    fn the_vcpu_runs_guest_code_while_an_ejected_disk_flushes() {
        use crate::arch::x86_64::layout;
        use crate::vstate::exit::ExitReason;
        use crate::vstate::vcpu::EntryPoint;
        use crate::vstate::vm::{Vm, VmParams};
        use std::sync::atomic::Ordering::SeqCst;

        if crate::vstate::vm::open_kvm().is_err() {
            return; // no KVM here
        }
        let vm = Vm::new(VmParams {
            cpus: 1,
            memory: 16 << 20,
            serial_out: Box::new(std::io::sink()),
            serial_input: false,
        })
        .expect("VM");
        let machine = Machine::new(MachineParams::for_vm(
            &vm,
            WorkerPool::new(2, "io-test").expect("workers"),
        ));
        machine
            .enable_hotplug(vm.mmio_bus(), vm.ged().clone())
            .expect("hotplug");
        let events = record_events(&machine);
        let probe = Arc::new(FlushProbe::default());
        insert(
            &machine,
            "slow",
            Arc::new(TestNode::SlowFlush(probe.clone())),
        );
        add_disk(
            &machine,
            json!({"driver": "virtio-blk-pci", "drive": "slow", "id": "vd0", "num-queues": 1}),
        )
        .expect("device_add");
        let slot = lock(&machine.state).disks[0].device.slot;
        machine.device_del("vd0").expect("device_del");

        // mov eax, B0EJ; mov dword [rax], 1 << slot; mov ebx, COUNTER;
        // 1: inc qword [rbx]; jmp 1b
        let counter = layout::HIGH_RAM_START + 0x1000;
        let mut code = vec![0xb8];
        code.extend(((layout::PCIHP_START + devices::acpi::PCIHP_B0EJ) as u32).to_le_bytes());
        code.extend([0xc7, 0x00]);
        code.extend((1u32 << slot).to_le_bytes());
        code.push(0xbb);
        code.extend((counter as u32).to_le_bytes());
        code.extend([0x48, 0xff, 0x03, 0xeb, 0xfb]);
        vm.memory()
            .write_slice(&code, GuestAddress(layout::HIGH_RAM_START))
            .expect("code");

        let memory = vm.memory().clone();
        let exit = vm.exit_state().clone();
        let watch_probe = probe.clone();
        let watcher = std::thread::spawn(move || {
            let start = Instant::now();
            let count = || memory.read_obj::<u64>(GuestAddress(counter)).unwrap();
            let mut during = None;
            while start.elapsed() < Duration::from_secs(30) {
                if watch_probe.started.load(SeqCst) && during.is_none() {
                    let before = count();
                    std::thread::sleep(Duration::from_millis(300));
                    let after = count();
                    during = Some((before, after, watch_probe.done.load(SeqCst)));
                }
                if watch_probe.done.load(SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            exit.request(ExitReason::Quit);
            during
        });
        let reason = vm
            .run(EntryPoint::Linux64 {
                entry: layout::HIGH_RAM_START,
                boot_params: layout::ZERO_PAGE_START,
            })
            .expect("running the VM");
        assert_eq!(reason, ExitReason::Quit);
        let (before, after, flush_over) = watcher
            .join()
            .expect("watcher")
            .expect("the ejected disk was never flushed");
        assert!(!flush_over, "the flush ended before the guest was watched");
        assert!(
            after > before,
            "the vCPU stood still during the teardown's flush ({before} -> {after})"
        );
        let thread = lock(&probe.thread).clone();
        assert_eq!(
            thread.as_deref(),
            Some("hotplug"),
            "the flush ran on {thread:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&events).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let events = lock(&events).clone();
        assert_eq!(
            events
                .last()
                .map(|(e, d)| (e.as_str(), d["device"].clone())),
            Some(("DEVICE_DELETED", json!("vd0"))),
            "{events:?}"
        );
        machine.shutdown();
    }

    /// Issue 11: a write failing with ENOSPC is reported as BLOCK_IO_ERROR
    /// with `nospace: true` (QEMU's meaning: the host ran out of space), and
    /// control errors carry kinds, not only messages.
    #[test]
    fn a_full_host_disk_is_reported_as_nospace_and_errors_have_kinds() {
        let Some((r, mut d)) = one_disk("full", TestNode::Full) else {
            return;
        };
        let m = &r.machine;
        let status = d.queue(0, 1, 0, 0x40_0000);
        d.notify();
        d.wait_used(1);
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            1,
            "IOERR"
        );
        let events = lock(&r.events).clone();
        let (_, report) = events
            .iter()
            .find(|(e, _)| e == "BLOCK_IO_ERROR")
            .unwrap_or_else(|| panic!("no BLOCK_IO_ERROR: {events:?}"));
        assert_eq!(report["nospace"], true, "{report}");
        assert_eq!(report["operation"], "write", "{report}");
        assert_eq!(report["node-name"], "full", "{report}");

        let in_use = m.blockdev_del("full").unwrap_err();
        assert_eq!(in_use.kind(), ErrorKind::InUse, "{in_use}");
        let missing = m.device_del("nope").unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
        let dup = add_disk(
            m,
            json!({"driver": "virtio-blk-pci", "drive": "full", "id": "vd0"}),
        )
        .unwrap_err();
        assert_eq!(dup.kind(), ErrorKind::InvalidArgument, "{dup}");
        let bad = m
            .blockdev_add(
                "",
                &args(json!({"node-name": "x", "driver": "file", "filename": "/nonexistent/x"})),
                None,
            )
            .unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::NotFound, "{bad}");
        m.shutdown();
    }
}
