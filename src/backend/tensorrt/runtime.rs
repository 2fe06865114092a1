//! The TensorRT backend proper (feature `tensorrt`): loads nvinfer at run time, deserializes an
//! engine through the C++ shim, and runs sessions on it.
//!
//! A session owns, allocated once: one device arena (256-byte-aligned input_ids / attention_mask /
//! position_ids, the logits, and two sets of past/present buffers that swap roles every step:
//! present of step t is past of step t+1, so the KV cache is never copied), pinned host staging,
//! an execution context and a non-blocking stream. Each call: one host-to-device copy of the
//! inputs, the shapes checked against the profile (pure Rust, `meta.rs`), then
//! `setOptimizationProfileAsync` (only when the phase changes) before `setInputShape`,
//! `enqueueV3`, and a device-to-host copy of only the last position's logits of each sequence.
//! The fixed buffers are bound when a profile is selected; the past/present pointers are re-bound
//! each step (a host-side pointer update) because they alternate.

use super::meta::{
    ElemType, EngineMeta, IoMode, Layout, ModelKind, Plan, ProfileMeta, ShapeRange, TensorMeta, arena_layout,
};
use super::staging::{self, Padding};
use super::{NVINFER_LIBRARY, engine_config};
use crate::backend::{Backend, BackendKind, BackendState, History, Profile};
use crate::error::{Error, ErrorKind, Result};
use crate::log::{LogLevel, emit};
use crate::model::ModelConfig;
use crate::sampling::Sampler;
use cudarc::driver::{result, sys};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// The shim's functions (`shim.cpp`): imports, not part of gpt2rt's C ABI.
/// cbindgen:ignore
mod shim {
    use std::ffi::{c_char, c_void};

    #[repr(C)]
    pub struct Tensor {
        pub name: *const c_char,
        pub is_input: i32,
        pub dtype: i32,
        pub rank: i32,
        pub dims: [i64; 8],
        pub linear: i32,
        pub on_device: i32,
        pub shape_tensor: i32,
    }

    pub type LogFn = unsafe extern "C" fn(user: *mut c_void, severity: i32, message: *const c_char);
    pub type CreateRuntimeFn = unsafe extern "C" fn(logger: *mut c_void, version: i32) -> *mut c_void;

    unsafe extern "C" {
        pub fn gpt2rt_trt_header_version() -> i32;
        pub fn gpt2rt_trt_runtime_create(create: CreateRuntimeFn, log: LogFn, user: *mut c_void) -> *mut c_void;
        pub fn gpt2rt_trt_engine_deserialize(runtime: *mut c_void, blob: *const c_void, size: usize) -> *mut c_void;
        pub fn gpt2rt_trt_engine_destroy(engine: *mut c_void);
        pub fn gpt2rt_trt_engine_num_io(engine: *mut c_void) -> i32;
        pub fn gpt2rt_trt_engine_num_profiles(engine: *mut c_void) -> i32;
        pub fn gpt2rt_trt_engine_io(engine: *mut c_void, index: i32, out: *mut Tensor) -> i32;
        pub fn gpt2rt_trt_engine_profile_shape(
            engine: *mut c_void,
            name: *const c_char,
            profile: i32,
            which: i32,
            dims: *mut i64,
        ) -> i32;
        pub fn gpt2rt_trt_context_create(engine: *mut c_void) -> *mut c_void;
        pub fn gpt2rt_trt_context_destroy(context: *mut c_void);
        pub fn gpt2rt_trt_context_set_profile(context: *mut c_void, profile: i32, stream: *mut c_void) -> i32;
        pub fn gpt2rt_trt_context_set_input_shape(
            context: *mut c_void,
            name: *const c_char,
            rank: i32,
            dims: *const i64,
        ) -> i32;
        pub fn gpt2rt_trt_context_tensor_shape(context: *mut c_void, name: *const c_char, dims: *mut i64) -> i32;
        pub fn gpt2rt_trt_context_set_address(context: *mut c_void, name: *const c_char, address: *mut c_void) -> i32;
        pub fn gpt2rt_trt_context_enqueue(context: *mut c_void, stream: *mut c_void) -> i32;
    }
}

thread_local! {
    /// The last error TensorRT logged on this thread (its errors are logged by the failing call).
    static TRT_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// TensorRT's logger: errors are kept for the failing call's message and, like warnings, passed to
/// the host's log callback; info goes out as debug; verbose is dropped.
unsafe extern "C" fn trt_log(_user: *mut c_void, severity: i32, message: *const c_char) {
    let _ = std::panic::catch_unwind(|| {
        let text = if message.is_null() {
            String::new()
        } else {
            // SAFETY: TensorRT passes a NUL-terminated string valid for the call.
            unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
        };
        let level = match severity {
            0 | 1 => LogLevel::Error,
            2 => LogLevel::Warn,
            3 => LogLevel::Debug,
            _ => return,
        };
        emit(level, &format!("tensorrt: {text}"));
        if level == LogLevel::Error {
            TRT_ERROR.with(|e| *e.borrow_mut() = text);
        }
    });
}

/// Forgets what TensorRT logged before, so a failure is only ever explained by its own message.
fn clear_trt_error() {
    TRT_ERROR.with(|e| e.borrow_mut().clear());
}

/// An error for a failed TensorRT call, with what TensorRT logged about it.
fn trt_error(kind: ErrorKind, what: impl fmt::Display) -> Error {
    let reason = TRT_ERROR.with(|e| std::mem::take(&mut *e.borrow_mut()));
    let reason = if reason.is_empty() { "TensorRT gave no reason".to_string() } else { reason };
    Error::new(kind, format!("{what}: {reason}"))
}

fn driver_error(what: &str, e: result::DriverError) -> Error {
    let name = e.error_name().ok().and_then(|n| n.to_str().ok()).unwrap_or("unknown CUDA error").to_string();
    let kind = if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY { ErrorKind::OutOfMemory } else { ErrorKind::Device };
    Error::new(kind, format!("tensorrt: {what}: {name}"))
}

trait Check<T> {
    fn check(self, what: &str) -> Result<T>;
}

impl<T> Check<T> for std::result::Result<T, result::DriverError> {
    fn check(self, what: &str) -> Result<T> {
        self.map_err(|e| driver_error(what, e))
    }
}

/// The loaded TensorRT 10 runtime library and the one `IRuntime` made from it (kept for the
/// process's lifetime: TensorRT keeps using the first logger it was given).
struct Nvinfer {
    _library: libloading::Library,
    version: (i32, i32, i32),
    runtime: *mut c_void,
}

// SAFETY: IRuntime::deserializeCudaEngine may be called from any thread; the library handle is
// never unloaded.
unsafe impl Send for Nvinfer {}
unsafe impl Sync for Nvinfer {}

static NVINFER: OnceLock<Result<Nvinfer>> = OnceLock::new();

fn nvinfer() -> Result<&'static Nvinfer> {
    NVINFER.get_or_init(load_nvinfer).as_ref().map_err(Clone::clone)
}

/// TensorRT's version number: major*10000 + minor*100 + patch since 10.0, major*1000 + ... before.
fn split_version(v: i32) -> (i32, i32, i32) {
    if v >= 10000 { (v / 10000, v / 100 % 100, v % 100) } else { (v / 1000, v / 100 % 10, v % 100) }
}

fn load_nvinfer() -> Result<Nvinfer> {
    let name = std::env::var("GPT2RT_NVINFER").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| NVINFER_LIBRARY.into());
    let path_var = if cfg!(windows) { "PATH" } else { "LD_LIBRARY_PATH" };
    // SAFETY: loading nvinfer runs its initialisers, which is what using TensorRT requires.
    let library = unsafe { libloading::Library::new(&name) }.map_err(|e| {
        // libloading's own text is "dlopen failed"; the loader's reason is its source.
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        err!(
            BackendUnavailable,
            "TensorRT runtime not found ({name}): {reason}. Install TensorRT 10 and put its lib directory on {path_var}, or set GPT2RT_NVINFER to the library's path"
        )
    })?;
    let symbol_error = |what: &str, e: libloading::Error| err!(BackendUnavailable, "{name} has no {what}: {e}");
    // SAFETY: getInferLibVersion is `int32_t getInferLibVersion() noexcept` in every TensorRT.
    let version = unsafe {
        let f = library
            .get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0")
            .map_err(|e| symbol_error("getInferLibVersion", e))?;
        f()
    };
    let (major, minor, patch) = split_version(version);
    if major != 10 {
        bail!(
            BackendUnavailable,
            "{name} is TensorRT {major}.{minor}.{patch}; gpt2rt's TensorRT shim supports TensorRT 10.x only"
        );
    }
    // SAFETY: the signature is `void* createInferRuntime_INTERNAL(void* logger, int32_t version)`.
    let create = unsafe {
        *library
            .get::<shim::CreateRuntimeFn>(b"createInferRuntime_INTERNAL\0")
            .map_err(|e| symbol_error("createInferRuntime_INTERNAL", e))?
    };
    // SAFETY: `create` comes from the loaded library; trt_log lives for the whole program.
    let runtime = unsafe { shim::gpt2rt_trt_runtime_create(create, trt_log, std::ptr::null_mut()) };
    if runtime.is_null() {
        return Err(trt_error(
            ErrorKind::BackendUnavailable,
            format!("TensorRT {major}.{minor}.{patch} ({name}) could not create a runtime"),
        ));
    }
    Ok(Nvinfer { _library: library, version: (major, minor, patch), runtime })
}

/// The TensorRT runtime first (so a machine without it says so), then the CUDA driver and a GPU.
pub fn availability() -> Result<()> {
    nvinfer()?;
    Gpu::probe(0).map(|_| ())
}

/// A retained primary context of one GPU: TensorRT runs in the primary context, so driver-API
/// allocations here and TensorRT's own share it.
struct Gpu {
    ctx: sys::CUcontext,
    device: sys::CUdevice,
    name: String,
}

// SAFETY: a CUDA context may be made current on any thread; every entry point calls bind() first.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Gpu {
    fn probe(ordinal: usize) -> Result<sys::CUdevice> {
        // SAFETY: only asks whether the driver library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            bail!(BackendUnavailable, "tensorrt: no NVIDIA driver found (libcuda could not be loaded)");
        }
        result::init()
            .map_err(|e| err!(BackendUnavailable, "tensorrt: the CUDA driver failed to initialise: {e:?}"))?;
        let count = result::device::get_count().check("counting GPUs")?;
        if ordinal >= count.max(0) as usize {
            bail!(BackendUnavailable, "tensorrt: device {ordinal} does not exist ({count} GPUs)");
        }
        result::device::get(ordinal as i32).check("opening the device")
    }

    fn open(ordinal: usize) -> Result<Self> {
        let device = Self::probe(ordinal)?;
        // SAFETY: a valid device; released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(device) }.check("retaining the primary context")?;
        let gpu = Self { ctx, device, name: result::device::get_name(device).unwrap_or_else(|_| "unknown GPU".into()) };
        gpu.bind()?;
        Ok(gpu)
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as self lives.
        unsafe { result::ctx::set_current(self.ctx) }.check("binding the context")
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: retained in open().
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

/// An engine and what gpt2rt read from it, shared by the backend and its sessions.
struct Shared {
    engine: *mut c_void,
    meta: EngineMeta,
    layout: Layout,
    /// NUL-terminated name of each tensor of `meta.tensors`.
    names: Vec<CString>,
    /// Serialises execution-context creation on the engine.
    create_lock: Mutex<()>,
    gpu: Gpu,
}

// SAFETY: the engine is only read after loading (metadata) and used to create contexts, which is
// serialised by `create_lock`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        // SAFETY: every context of this engine died with its session (each holds an Arc<Shared>).
        unsafe { shim::gpt2rt_trt_engine_destroy(self.engine) };
    }
}

fn read_meta(engine: *mut c_void) -> Result<(EngineMeta, Vec<CString>)> {
    // SAFETY: `engine` is a live ICudaEngine; the shim writes only into `desc`/`dims`.
    unsafe {
        let count = shim::gpt2rt_trt_engine_num_io(engine);
        let mut tensors = Vec::new();
        let mut names = Vec::new();
        for i in 0..count {
            let mut desc = std::mem::zeroed::<shim::Tensor>();
            if shim::gpt2rt_trt_engine_io(engine, i, &mut desc) != 0 || desc.name.is_null() {
                bail!(ModelFormat, "TensorRT lists {count} I/O tensors but cannot describe tensor {i}");
            }
            let name = CStr::from_ptr(desc.name).to_owned();
            let rank = desc.rank.clamp(0, 8) as usize;
            tensors.push(TensorMeta {
                name: name.to_string_lossy().into_owned(),
                mode: if desc.is_input != 0 { IoMode::Input } else { IoMode::Output },
                dtype: ElemType::from_trt(desc.dtype),
                dims: desc.dims[..rank].to_vec(),
                linear: desc.linear != 0,
                on_device: desc.on_device != 0,
                shape_tensor: desc.shape_tensor != 0,
            });
            names.push(name);
        }
        let mut profiles = Vec::new();
        for p in 0..shim::gpt2rt_trt_engine_num_profiles(engine) {
            let mut ranges = Vec::new();
            for (t, name) in tensors.iter().zip(&names).filter(|(t, _)| t.mode == IoMode::Input) {
                let get = |which: i32| -> Result<Vec<i64>> {
                    let mut dims = [0i64; 8];
                    let rank =
                        shim::gpt2rt_trt_engine_profile_shape(engine, name.as_ptr(), p, which, dims.as_mut_ptr());
                    if !(0..=8).contains(&rank) {
                        bail!(ModelFormat, "TensorRT has no shapes for input {} in profile {p}", t.name);
                    }
                    Ok(dims[..rank as usize].to_vec())
                };
                ranges.push(ShapeRange { min: get(0)?, opt: get(1)?, max: get(2)? });
            }
            profiles.push(ProfileMeta { ranges });
        }
        Ok((EngineMeta { tensors, profiles }, names))
    }
}

/// A TensorRT engine on one GPU.
pub struct TrtBackend {
    shared: Arc<Shared>,
    config: ModelConfig,
    limits: Profile,
    description: String,
}

impl fmt::Debug for TrtBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrtBackend").field("layout", &self.shared.layout).field("limits", &self.limits).finish()
    }
}

impl TrtBackend {
    pub fn load(path: &Path, config: Option<ModelConfig>, device: usize) -> Result<Self> {
        let trt = nvinfer()?;
        let bytes = std::fs::read(path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::FileNotFound } else { ErrorKind::Io };
            Error::new(kind, format!("engine file {}: {e}", path.display()))
        })?;
        let gpu = Gpu::open(device)?;
        clear_trt_error();
        // SAFETY: the runtime is live for the process; TensorRT copies what it needs from `bytes`.
        let engine = unsafe { shim::gpt2rt_trt_engine_deserialize(trt.runtime, bytes.as_ptr().cast(), bytes.len()) };
        if engine.is_null() {
            return Err(trt_error(
                ErrorKind::ModelFormat,
                format!(
                    "TensorRT {}.{}.{} could not deserialize {} (an engine runs only on the TensorRT version and GPU it was built for: rebuild it here with the command `gpt2rt trt-command` prints)",
                    trt.version.0,
                    trt.version.1,
                    trt.version.2,
                    path.display()
                ),
            ));
        }
        let (meta, names) = match read_meta(engine) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: nothing else holds the engine yet.
                unsafe { shim::gpt2rt_trt_engine_destroy(engine) };
                return Err(e);
            }
        };
        let layout = Layout::from_meta(&meta).map_err(|e| e.context(path.display()));
        let layout = match layout {
            Ok(l) => l,
            Err(e) => {
                // SAFETY: as above.
                unsafe { shim::gpt2rt_trt_engine_destroy(engine) };
                return Err(e);
            }
        };
        let (max_batch, max_seq) = layout.limits(&meta).unwrap_or((1, 1));
        let config = engine_config(&layout, max_seq, config)?;
        // SAFETY: reports the headers the shim was compiled with.
        let header = split_version(unsafe { shim::gpt2rt_trt_header_version() });
        let kind = match layout.kind {
            ModelKind::KvCache => format!(
                "KV-cache engine, {} layers, {} heads x {}, past/present {}",
                layout.n_layer, layout.n_head, layout.head_dim, layout.kv_dtype
            ),
            ModelKind::NoPast => "engine without past state (every step recomputes the sequence)".into(),
        };
        let description = format!(
            "tensorrt {}.{}.{} (shim built with {}.{}.{} headers) on {}: {} ({kind}, vocab {})\n{meta}",
            trt.version.0,
            trt.version.1,
            trt.version.2,
            header.0,
            header.1,
            header.2,
            gpu.name,
            path.display(),
            layout.vocab_size
        );
        let shared = Shared { engine, meta, layout, names, create_lock: Mutex::new(()), gpu };
        Ok(Self { shared: Arc::new(shared), config, limits: Profile { max_batch, max_seq }, description })
    }
}

impl Backend for TrtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::TensorRt
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn limits(&self) -> Profile {
        self.limits
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn new_state(&self, profile: Profile, kv_cache: bool) -> Result<Box<dyn BackendState>> {
        Ok(Box::new(TrtState::new(self.shared.clone(), profile, kv_cache)?))
    }
}

/// Device and pinned-host memory, a stream and an execution context; freed in Drop whatever was
/// made before a failure.
struct Resources {
    shared: Arc<Shared>,
    arena: sys::CUdeviceptr,
    host_inputs: *mut u8,
    host_inputs_len: usize,
    host_logits: *mut u8,
    host_logits_len: usize,
    stream: sys::CUstream,
    context: *mut c_void,
}

impl Drop for Resources {
    fn drop(&mut self) {
        let _ = self.shared.gpu.bind();
        // SAFETY: each handle was created by this struct and is released once; the stream is
        // drained first so nothing in flight uses the memory.
        unsafe {
            if !self.stream.is_null() {
                let _ = result::stream::synchronize(self.stream);
            }
            if !self.context.is_null() {
                shim::gpt2rt_trt_context_destroy(self.context);
            }
            if !self.stream.is_null() {
                let _ = result::stream::destroy(self.stream);
            }
            if self.arena != 0 {
                let _ = result::free_sync(self.arena);
            }
            for ptr in [self.host_inputs, self.host_logits] {
                if !ptr.is_null() {
                    let _ = result::free_host(ptr.cast());
                }
            }
        }
    }
}

/// One session on a TensorRT engine.
struct TrtState {
    res: Resources,
    plan: Plan,
    padding: Padding,
    /// Device address of each input's buffer and of the logits, by tensor index.
    ids: u64,
    mask: u64,
    positions: u64,
    logits: u64,
    /// Byte offsets of input_ids, attention_mask and position_ids in the arena and in the pinned
    /// staging (the same, so one copy moves all three).
    input_offsets: [usize; 3],
    /// Past/present buffers: `kv[side][k]` for the k-th tensor of `layout.past.flatten()`.
    kv: [Vec<u64>; 2],
    /// Which side holds the current past.
    side: usize,
    /// Width of the (left-padded) past, and each sequence's pads in it.
    past_len: usize,
    pads: Vec<usize>,
    lens: Vec<usize>,
    history: History,
    scratch_ids: Vec<i64>,
    scratch_mask: Vec<i64>,
    scratch_positions: Vec<i64>,
    logits_f32: Vec<f32>,
    current_profile: Option<usize>,
    batch: usize,
}

// SAFETY: the raw handles belong to this session alone and are used from one thread at a time
// (BackendState is Send, not Sync).
unsafe impl Send for Resources {}

impl fmt::Debug for TrtState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrtState").field("plan", &self.plan).field("batch", &self.batch).finish()
    }
}

impl TrtState {
    fn new(shared: Arc<Shared>, profile: Profile, kv_cache: bool) -> Result<Self> {
        let plan = shared.layout.plan(&shared.meta, profile.max_batch, profile.max_seq, kv_cache)?;
        shared.gpu.bind()?;
        let (b, s) = (profile.max_batch, profile.max_seq);
        let l = &shared.layout;
        let meta = &shared.meta;
        let esize = |i: Option<usize>| i.map_or(0, |i| meta.tensors[i].dtype.size());
        let vocab = l.vocab_size;
        let kv_bytes = b * l.n_head * s * l.head_dim * l.kv_dtype.size();
        let kv_count = l.past.len() * 2;
        let mut sizes = vec![
            b * s * esize(Some(l.input_ids)),
            b * s * esize(l.attention_mask),
            b * s * esize(l.position_ids),
            b * s * vocab * esize(Some(l.logits)),
        ];
        sizes.extend(std::iter::repeat_n(kv_bytes, 2 * kv_count));
        let (offsets, total) = arena_layout(&sizes);
        let mut res = Resources {
            shared: shared.clone(),
            arena: 0,
            host_inputs: std::ptr::null_mut(),
            host_inputs_len: offsets[3],
            host_logits: std::ptr::null_mut(),
            host_logits_len: b * vocab * esize(Some(l.logits)),
            stream: std::ptr::null_mut(),
            context: std::ptr::null_mut(),
        };
        // SAFETY: plain allocations, owned by `res`.
        unsafe {
            res.arena = result::malloc_sync(total).check("allocating the session's device buffers")?;
            res.host_inputs =
                result::malloc_host(res.host_inputs_len, 0).check("allocating pinned input staging")?.cast();
            res.host_logits =
                result::malloc_host(res.host_logits_len, 0).check("allocating pinned logits staging")?.cast();
        }
        res.stream = result::stream::create(result::stream::StreamKind::NonBlocking).check("creating a stream")?;
        clear_trt_error();
        {
            let _guard = shared.create_lock.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: a live engine; the context is destroyed in Resources::drop.
            res.context = unsafe { shim::gpt2rt_trt_context_create(shared.engine) };
        }
        if res.context.is_null() {
            return Err(trt_error(ErrorKind::OutOfMemory, "TensorRT could not create an execution context"));
        }
        let at = |k: usize| res.arena + offsets[k] as u64;
        let kv = [(0..kv_count).map(|k| at(4 + k)).collect(), (0..kv_count).map(|k| at(4 + kv_count + k)).collect()];
        debug_assert!(offsets.iter().all(|o| (res.arena + *o as u64) % 256 == 0));
        let padding =
            if l.position_ids.is_some() && l.attention_mask.is_some() { Padding::Left } else { Padding::Right };
        Ok(Self {
            plan,
            padding,
            ids: at(0),
            mask: at(1),
            positions: at(2),
            logits: at(3),
            input_offsets: [offsets[0], offsets[1], offsets[2]],
            kv,
            side: 0,
            past_len: 0,
            pads: vec![0; b],
            lens: vec![0; b],
            history: History::new(profile),
            scratch_ids: vec![0; b * s],
            scratch_mask: vec![0; b * s],
            scratch_positions: vec![0; b * s],
            logits_f32: vec![0.0; b * vocab],
            current_profile: None,
            batch: 0,
            res,
        })
    }

    fn set_address(&self, tensor: usize, address: u64) -> Result<()> {
        let name = &self.res.shared.names[tensor];
        // SAFETY: a live context; the address points into this session's arena.
        if unsafe { shim::gpt2rt_trt_context_set_address(self.res.context, name.as_ptr(), address as *mut c_void) } != 1
        {
            return Err(trt_error(
                ErrorKind::Device,
                format!("TensorRT refused the address of {}", name.to_string_lossy()),
            ));
        }
        Ok(())
    }

    /// Stages `values` for `tensor` (if the engine has it) at its offset in the pinned buffer.
    fn stage(&mut self, tensor: Option<usize>, slot: usize, len: usize) {
        let Some(t) = tensor else { return };
        let dtype = self.res.shared.meta.tensors[t].dtype;
        let values = match slot {
            0 => &self.scratch_ids[..len],
            1 => &self.scratch_mask[..len],
            _ => &self.scratch_positions[..len],
        };
        let offset = self.input_offsets[slot];
        // SAFETY: the pinned buffer holds `host_inputs_len` bytes and each slot's region fits
        // max_batch * max_seq values of its type (sizes computed in new()).
        let out = unsafe {
            std::slice::from_raw_parts_mut(self.res.host_inputs.add(offset), self.res.host_inputs_len - offset)
        };
        staging::encode(dtype, values, out);
    }

    /// Uploads the staged inputs (one copy), checks the shapes, and enqueues one call of
    /// `new` positions on top of `past` cached ones.
    fn run(&mut self, profile: usize, batch: usize, new: usize, past: usize) -> Result<()> {
        let shared = self.res.shared.clone();
        let l = &shared.layout;
        let (ids_len, mask_len) = (batch * new, batch * (past + new));
        self.stage(Some(l.input_ids), 0, ids_len);
        self.stage(l.attention_mask, 1, mask_len);
        self.stage(l.position_ids, 2, ids_len);
        let mut shapes = vec![(l.input_ids, vec![batch as i64, new as i64])];
        if let Some(i) = l.attention_mask {
            shapes.push((i, vec![batch as i64, (past + new) as i64]));
        }
        if let Some(i) = l.position_ids {
            shapes.push((i, vec![batch as i64, new as i64]));
        }
        for &i in l.past.iter().flatten() {
            shapes.push((i, vec![batch as i64, l.n_head as i64, past as i64, l.head_dim as i64]));
        }
        l.check_call(&shared.meta, profile, &shapes)?;
        shared.gpu.bind()?;
        clear_trt_error();
        let stream = self.res.stream;
        // SAFETY: host_inputs holds host_inputs_len bytes, the arena's input region as many.
        unsafe {
            let staged = std::slice::from_raw_parts(self.res.host_inputs, self.res.host_inputs_len);
            result::memcpy_htod_async(self.ids, staged, stream).check("copying the inputs to the device")?;
        }
        if self.current_profile != Some(profile) {
            // SAFETY: a live context and stream. Must precede setInputShape.
            if unsafe { shim::gpt2rt_trt_context_set_profile(self.res.context, profile as i32, stream.cast()) } != 1 {
                return Err(trt_error(ErrorKind::Device, format!("TensorRT refused optimization profile {profile}")));
            }
            self.current_profile = Some(profile);
            self.set_address(l.input_ids, self.ids)?;
            if let Some(i) = l.attention_mask {
                self.set_address(i, self.mask)?;
            }
            if let Some(i) = l.position_ids {
                self.set_address(i, self.positions)?;
            }
            self.set_address(l.logits, self.logits)?;
        }
        for (tensor, dims) in &shapes {
            let name = &shared.names[*tensor];
            // SAFETY: a live context; `dims` outlives the call.
            if unsafe {
                shim::gpt2rt_trt_context_set_input_shape(
                    self.res.context,
                    name.as_ptr(),
                    dims.len() as i32,
                    dims.as_ptr(),
                )
            } != 1
            {
                return Err(trt_error(
                    ErrorKind::ProfileUnsupported,
                    format!("TensorRT refused shape {dims:?} for {} in profile {profile}", name.to_string_lossy()),
                ));
            }
        }
        let (from, to) = (self.side, 1 - self.side);
        for (k, (&past_t, &present_t)) in l.past.iter().flatten().zip(l.present.iter().flatten()).enumerate() {
            self.set_address(past_t, self.kv[from][k])?;
            self.set_address(present_t, self.kv[to][k])?;
        }
        for (tensor, want) in l.output_shapes(batch, past, new) {
            let mut dims = [0i64; 8];
            let name = &shared.names[tensor];
            // SAFETY: a live context; writes up to 8 dims.
            let rank =
                unsafe { shim::gpt2rt_trt_context_tensor_shape(self.res.context, name.as_ptr(), dims.as_mut_ptr()) };
            if rank < 0 || dims[..rank.clamp(0, 8) as usize] != want[..] {
                bail!(
                    ModelFormat,
                    "the engine computes {} as {:?} where gpt2rt expects {want:?}: was it built from tools/export_onnx.py's model?",
                    name.to_string_lossy(),
                    &dims[..rank.clamp(0, 8) as usize]
                );
            }
        }
        // SAFETY: every I/O tensor has a shape and an address inside this session's buffers.
        if unsafe { shim::gpt2rt_trt_context_enqueue(self.res.context, stream.cast()) } != 1 {
            return Err(trt_error(ErrorKind::Device, "enqueueV3 failed"));
        }
        Ok(())
    }

    /// Copies the logits of each sequence's last position (`columns`) to the host and waits.
    fn fetch_logits(&mut self, batch: usize, new: usize, columns: impl Iterator<Item = usize>) -> Result<()> {
        let shared = self.res.shared.clone();
        let dtype = shared.meta.tensors[shared.layout.logits].dtype;
        let row = shared.layout.vocab_size * dtype.size();
        let stream = self.res.stream;
        // SAFETY: host_logits holds max_batch rows; each source row lies inside the logits buffer
        // ([batch, new, vocab] written by the call just enqueued on the same stream).
        unsafe {
            let host = std::slice::from_raw_parts_mut(self.res.host_logits, self.res.host_logits_len);
            if new == 1 {
                result::memcpy_dtoh_async(&mut host[..batch * row], self.logits, stream).check("copying the logits")?;
            } else {
                for (seq, col) in columns.enumerate() {
                    let src = self.logits + ((seq * new + col) * row) as u64;
                    result::memcpy_dtoh_async(&mut host[seq * row..][..row], src, stream)
                        .check("copying the logits")?;
                }
            }
            result::stream::synchronize(stream).check("running the engine")?;
            let host = std::slice::from_raw_parts(self.res.host_logits, batch * row);
            let vocab = shared.layout.vocab_size;
            for seq in 0..batch {
                staging::decode_logits(dtype, &host[seq * row..][..row], &mut self.logits_f32[seq * vocab..][..vocab]);
            }
        }
        Ok(())
    }

    /// Runs every sequence of the history from position 0 (prefill, and steps that recompute).
    fn full_pass(&mut self) -> Result<()> {
        let batch = self.history.batch();
        for seq in 0..batch {
            self.lens[seq] = self.history.len(seq);
        }
        let history = &self.history;
        let width = staging::fill_full(
            self.padding,
            &self.lens[..batch],
            |s, p| history.token(s, p),
            &mut self.scratch_ids,
            &mut self.scratch_mask,
            &mut self.scratch_positions,
        );
        self.side = 0;
        self.run(self.plan.full, batch, width, 0)?;
        let lens = std::mem::take(&mut self.lens);
        let result = self.fetch_logits(batch, width, staging::last_columns(self.padding, &lens[..batch], width));
        self.lens = lens;
        result?;
        if self.plan.decode.is_some() {
            self.side = 1;
            self.past_len = width;
            for seq in 0..batch {
                self.pads[seq] = width - self.lens[seq];
            }
        }
        self.batch = batch;
        Ok(())
    }
}

impl BackendState for TrtState {
    fn prefill(&mut self, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        self.history.store_prompts(tokens, lengths);
        self.full_pass()
    }

    fn step(&mut self, tokens: &[u32]) -> Result<()> {
        self.history.append(tokens);
        let Some(profile) = self.plan.decode else {
            return self.full_pass();
        };
        let batch = self.batch;
        let width = self.past_len + 1;
        for (seq, &token) in tokens.iter().enumerate() {
            self.scratch_ids[seq] = i64::from(token);
            self.scratch_positions[seq] = (self.history.len(seq) - 1) as i64;
        }
        staging::fill_decode_mask(&self.pads[..batch], width, &mut self.scratch_mask);
        self.run(profile, batch, 1, self.past_len)?;
        self.fetch_logits(batch, 1, std::iter::empty())?;
        self.side = 1 - self.side;
        self.past_len += 1;
        Ok(())
    }

    fn read_logits(&mut self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.logits_f32[..out.len()]);
        Ok(())
    }

    fn select(&mut self, sampler: &mut Sampler, out: &mut [u32]) -> Result<()> {
        let vocab = self.res.shared.layout.vocab_size;
        for (seq, slot) in out.iter_mut().enumerate() {
            *slot = sampler.select(seq, &self.logits_f32[seq * vocab..][..vocab]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_split_in_both_encodings() {
        assert_eq!(split_version(101601), (10, 16, 1));
        assert_eq!(split_version(100000), (10, 0, 0));
        assert_eq!(split_version(110100), (11, 1, 0));
        assert_eq!(split_version(8601), (8, 6, 1));
    }

    #[test]
    fn without_nvinfer_the_backend_names_the_library() {
        if std::env::var_os("GPT2RT_NVINFER").is_some() || nvinfer().is_ok() {
            eprintln!("skipped: a TensorRT runtime is present");
            return;
        }
        let e = availability().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BackendUnavailable);
        assert!(e.message().contains(&format!("TensorRT runtime not found ({NVINFER_LIBRARY})")), "{e}");
        let e = TrtBackend::load(Path::new("model.engine"), None, 0).unwrap_err();
        assert!(e.message().contains("TensorRT runtime not found"), "{e}");
    }

    #[test]
    fn the_shim_was_built_with_tensorrt_10_headers() {
        // SAFETY: returns a constant.
        let (major, _, _) = split_version(unsafe { shim::gpt2rt_trt_header_version() });
        assert_eq!(major, 10);
    }
}
