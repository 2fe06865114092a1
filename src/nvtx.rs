//! NVTX ranges for Nsight Systems, without linking libnvToolsExt or shipping NVIDIA's headers.
//!
//! Nsight Systems (and any NVTX tool) receives NVTX events through the NVTX v3 *injection*
//! protocol: the tool sets `NVTX_INJECTION64_PATH` (`NVTX_INJECTION32_PATH` in a 32-bit process)
//! to its injection library; the NVTX client in the process loads it, calls its
//! `InitializeInjectionNvtx2(GetExportTable)`, and the injection asks `GetExportTable` for the
//! callbacks table, through which it writes its own function pointers into the client's
//! per-module slots. This module is that client side, written in Rust from the protocol as NVIDIA's
//! headers define it (`nvtx3/nvtxDetail/nvtxTypes.h`, `nvtxImpl.h`, `nvtxInit.h` of
//! github.com/NVIDIA/NVTX); nothing of them is copied here.
//!
//! Enabling is process-wide and happens at most once ([`enable`], called by `Engine::load` when
//! the `nvtx` engine option or `GPT2RT_NVTX=1` asks for it): NVTX itself is per process. After
//! that, the ranges of every engine in the process are sent to the tool. While nothing is enabled,
//! or when no tool is attached, a range costs one atomic load (acquire: a plain load on x86-64)
//! and a branch. Range names are static NUL-terminated strings: nothing is allocated per range.

use crate::log::{LogLevel, emit};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

/// `gpt2rt generate`: one whole generation (prefill, steps, selections).
pub const GENERATE: &CStr = c"gpt2rt generate";
/// `gpt2rt prefill`: the prompts' forward pass (and, on CUDA, their upload).
pub const PREFILL: &CStr = c"gpt2rt prefill";
/// `gpt2rt step`: one decode step's forward pass.
pub const STEP: &CStr = c"gpt2rt step";
/// `gpt2rt select`: next-token choice (argmax or sampling) and the copy of the token ids to the host.
pub const SELECT: &CStr = c"gpt2rt select";
/// `gpt2rt read_logits`: the copy of the last logits to the host.
pub const READ_LOGITS: &CStr = c"gpt2rt read_logits";
/// `H2D tokens`: the upload of token ids (CUDA backend).
pub const H2D_TOKENS: &CStr = c"H2D tokens";
/// `D2H logits`: the copy of `[batch, vocab]` logits to pinned host memory and its wait (CUDA).
pub const D2H_LOGITS: &CStr = c"D2H logits";
/// `D2H token ids`: the copy of the chosen token ids to pinned host memory and its wait (CUDA).
pub const D2H_TOKEN_IDS: &CStr = c"D2H token ids";

// --- The protocol's constants. Each comes from nvtx3/nvtxDetail/nvtxTypes.h (NVIDIA/NVTX). ---

/// `NVTX_ETID_CALLBACKS` (enum NvtxExportTableID): the table holding `GetModuleFunctionTable`.
const ETID_CALLBACKS: u32 = 1;
/// `NVTX_ETID_VERSIONINFO` (enum NvtxExportTableID): the client's NVTX API version.
const ETID_VERSIONINFO: u32 = 3;
/// `NVTX_VERSION` (nvtx3/nvToolsExt.h): this client speaks version 3 of the API.
const NVTX_VERSION: u32 = 3;

/// Callback modules (enum NvtxCallbackModule: INVALID = 0, CORE = 1, CUDA = 2, OPENCL = 3,
/// CUDART = 4, CORE2 = 5, SYNC = 6) with each one's `NVTX_CBID_<MODULE>_SIZE` (one past its last
/// callback id, enums NvtxCallbackIdCore ... NvtxCallbackIdSync). Only CORE is used; the others get
/// tables too, as NVIDIA's client gives them, so a tool that asks for them sees the same answers.
const MODULE_SIZES: [(c_int, usize); 6] = [(1, 16), (2, 9), (3, 15), (4, 7), (5, 16), (6, 7)];
/// `NVTX_CB_MODULE_CORE`.
const MODULE_CORE: c_int = 1;
/// `NVTX_CBID_CORE_RangePushA`: `int (const char* message)`.
const CBID_CORE_RANGE_PUSH_A: usize = 9;
/// `NVTX_CBID_CORE_RangePop`: `int (void)`.
const CBID_CORE_RANGE_POP: usize = 11;

// NVTX_API is __stdcall on Windows and the C convention elsewhere: "system" is exactly that.
type RangePushA = unsafe extern "system" fn(*const c_char) -> c_int;
type RangePop = unsafe extern "system" fn() -> c_int;
type GetExportTable = unsafe extern "system" fn(u32) -> *const c_void;
type InitializeInjection = unsafe extern "system" fn(GetExportTable) -> c_int;
/// `NvtxFunctionTable`: `table[cbid]` points at the slot of callback `cbid`.
type FunctionTable = *mut *mut *mut c_void;

/// `NvtxExportTableCallbacks` (nvtxTypes.h).
#[repr(C)]
struct ExportTableCallbacks {
    struct_size: usize,
    get_module_function_table: unsafe extern "system" fn(c_int, *mut FunctionTable, *mut c_uint) -> c_int,
}

/// `NvtxExportTableVersionInfo` (nvtxTypes.h).
#[repr(C)]
struct ExportTableVersionInfo {
    struct_size: usize,
    version: u32,
    reserved0: u32,
    set_injection_nvtx_version: unsafe extern "system" fn(u32),
}

static CALLBACKS: ExportTableCallbacks =
    ExportTableCallbacks { struct_size: std::mem::size_of::<ExportTableCallbacks>(), get_module_function_table };

static VERSION_INFO: ExportTableVersionInfo = ExportTableVersionInfo {
    struct_size: std::mem::size_of::<ExportTableVersionInfo>(),
    version: NVTX_VERSION,
    reserved0: 0,
    set_injection_nvtx_version,
};

/// The functions the injection installed, published once its initialization succeeded (release),
/// read by every range (acquire). NULL: no tool, ranges do nothing.
static RANGE_PUSH_A: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static RANGE_POP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The slots the injection writes during `InitializeInjectionNvtx2` and the per-module tables
/// that point at them, laid out as nvtxImpl.h lays out its `functionTable_<MODULE>` arrays:
/// `SIZE + 1` entries, entry 0 (the INVALID id) and the last one NULL, so that a tool reading
/// past the end crashes instead of corrupting memory; the size reported is `SIZE` (the entries
/// minus the trailing NULL), and a tool only writes ids below it. Leaked: a tool may keep them.
struct Modules {
    tables: Vec<(c_int, Vec<*mut *mut c_void>)>,
    core_slots: *mut *mut c_void,
}

static MODULES: AtomicPtr<Modules> = AtomicPtr::new(std::ptr::null_mut());
static STATE: OnceLock<String> = OnceLock::new();

fn leak_modules() -> &'static Modules {
    let mut core_slots = std::ptr::null_mut();
    let tables = MODULE_SIZES
        .iter()
        .map(|&(module, size)| {
            // Every pointer into the slots derives from this one base pointer.
            let base = Vec::leak(vec![std::ptr::null_mut::<c_void>(); size]).as_mut_ptr();
            if module == MODULE_CORE {
                core_slots = base;
            }
            let mut table = vec![std::ptr::null_mut(); size + 1];
            for (id, entry) in table.iter_mut().enumerate().take(size).skip(1) {
                // SAFETY: id < size, inside the leaked slots.
                *entry = unsafe { base.add(id) };
            }
            (module, table)
        })
        .collect();
    Box::leak(Box::new(Modules { tables, core_slots }))
}

/// `NvtxGetExportTableFunc_t`: what the injection calls to reach this client.
unsafe extern "system" fn get_export_table(id: u32) -> *const c_void {
    match id {
        ETID_CALLBACKS => (&raw const CALLBACKS).cast(),
        ETID_VERSIONINFO => (&raw const VERSION_INFO).cast(),
        _ => std::ptr::null(),
    }
}

/// `GetModuleFunctionTable`: 1 and the module's table and size, or 0 for a module this client
/// does not have (as NVIDIA's client answers).
unsafe extern "system" fn get_module_function_table(
    module: c_int,
    out_table: *mut FunctionTable,
    out_size: *mut c_uint,
) -> c_int {
    // SAFETY: MODULES is set (to a leaked, never freed value) before the injection is called.
    let Some(modules) = (unsafe { MODULES.load(Ordering::Acquire).as_ref() }) else {
        return 0;
    };
    let Some((_, table)) = modules.tables.iter().find(|(m, _)| *m == module) else {
        return 0;
    };
    // SAFETY: the tool passes valid out-pointers or NULL for what it does not want.
    unsafe {
        if let Some(size) = out_size.as_mut() {
            *size = (table.len() - 1) as c_uint;
        }
        if let Some(out) = out_table.as_mut() {
            // The tool reads the table and writes through its entries, never into it.
            *out = table.as_ptr().cast_mut();
        }
    }
    1
}

/// `SetInjectionNvtxVersion`: reserved by the protocol; nothing to do.
unsafe extern "system" fn set_injection_nvtx_version(_version: u32) {}

/// Whether `GPT2RT_NVTX` asks for NVTX ranges (set, not empty, not `0`).
pub fn requested_by_env() -> bool {
    std::env::var_os("GPT2RT_NVTX").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Attaches to an NVTX tool, once per process, and says what happened (the same text on every
/// call; also sent to the log). Without `NVTX_INJECTION64_PATH`, or when the tool's library cannot
/// be loaded, lacks `InitializeInjectionNvtx2` or returns 0 from it, ranges stay off.
pub fn enable() -> &'static str {
    STATE.get_or_init(|| {
        let (level, text) = match attach() {
            Ok(text) => (LogLevel::Info, text),
            Err(text) => (LogLevel::Warn, format!("nvtx: ranges off: {text}")),
        };
        emit(level, &text);
        text
    })
}

/// Whether ranges currently reach a tool.
pub fn active() -> bool {
    !RANGE_PUSH_A.load(Ordering::Acquire).is_null()
}

fn attach() -> std::result::Result<String, String> {
    let var = if cfg!(target_pointer_width = "32") { "NVTX_INJECTION32_PATH" } else { "NVTX_INJECTION64_PATH" };
    let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) else {
        return Err(format!("{var} is not set (no NVTX tool such as Nsight Systems is attached)"));
    };
    let shown = std::path::Path::new(&path).display().to_string();
    // SAFETY: loading a tool's library runs its initializers; that is what the tool asked for.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| {
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        format!("could not load the injection library {shown} ({var}): {reason}")
    })?;
    // SAFETY: the protocol defines this symbol with this signature.
    let init = unsafe { library.get::<InitializeInjection>(b"InitializeInjectionNvtx2\0") }
        .map(|symbol| *symbol)
        .map_err(|e| format!("{shown} has no InitializeInjectionNvtx2: {e}"))?;
    let modules = leak_modules();
    MODULES.store((modules as *const Modules).cast_mut(), Ordering::Release);
    // SAFETY: the protocol's entry point, given our GetExportTable; it writes its functions into
    // our slots before returning.
    if unsafe { init(get_export_table) } == 0 {
        // Whatever the tool wrote is not published; the library is unloaded (as NVIDIA's client does).
        return Err(format!("the injection library {shown} returned 0 from InitializeInjectionNvtx2"));
    }
    // SAFETY: the core slots are a leaked array of the CORE module's size; the injection is done
    // writing them (it returned).
    let slot = |id: usize| unsafe { modules.core_slots.add(id).read() };
    let (push, pop) = (slot(CBID_CORE_RANGE_PUSH_A), slot(CBID_CORE_RANGE_POP));
    // The tool stays loaded for the rest of the process: its functions are called from now on.
    std::mem::forget(library);
    if push.is_null() || pop.is_null() {
        return Err(format!("the injection library {shown} installed no RangePushA / RangePop"));
    }
    RANGE_POP.store(pop, Ordering::Release);
    RANGE_PUSH_A.store(push, Ordering::Release);
    Ok(format!("nvtx: ranges on, sent to {shown}"))
}

/// An open NVTX range on this thread; dropping it closes the range. It remembers whether it was
/// pushed, so a range opened before the tool attached is not popped after.
#[must_use = "a range closes when dropped: bind it with `let _range = ...`"]
pub struct Range {
    pushed: bool,
}

/// Opens a range named `name` on the calling thread (a no-op without a tool).
#[inline]
pub fn range(name: &'static CStr) -> Range {
    let push = RANGE_PUSH_A.load(Ordering::Acquire);
    if push.is_null() {
        return Range { pushed: false };
    }
    // SAFETY: a non-NULL value is the tool's RangePushA, published after its initialization.
    unsafe { std::mem::transmute::<*mut c_void, RangePushA>(push)(name.as_ptr()) };
    Range { pushed: true }
}

impl Drop for Range {
    #[inline]
    fn drop(&mut self) {
        if self.pushed {
            let pop = RANGE_POP.load(Ordering::Acquire);
            // SAFETY: published together with RangePushA (before it), never unset.
            unsafe { std::mem::transmute::<*mut c_void, RangePop>(pop)() };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_protocol_layout() {
        let modules = leak_modules();
        for &(module, size) in &MODULE_SIZES {
            let (_, table) = modules.tables.iter().find(|(m, _)| *m == module).unwrap();
            assert_eq!(table.len(), size + 1, "module {module}: SIZE + 1 entries");
            assert!(table[0].is_null() && table[size].is_null(), "module {module}: NULL first and last");
            assert!(table[1..size].iter().all(|p| !p.is_null()));
        }
        let (_, core) = modules.tables.iter().find(|(m, _)| *m == MODULE_CORE).unwrap();
        // SAFETY: core_slots has the CORE module's 16 entries.
        assert_eq!(core[CBID_CORE_RANGE_PUSH_A], unsafe { modules.core_slots.add(CBID_CORE_RANGE_PUSH_A) });
    }

    #[test]
    fn a_range_without_a_tool_does_nothing() {
        let r = range(GENERATE);
        assert!(!r.pushed);
    }
}
