// The P/Invoke declarations and the exact mirrors of the C structs of include/gpt2rt.h.
// Handles cross as IntPtr: the SafeHandle wrappers (Handles.cs) add a reference around every call,
// which works the same under Mono, .NET and IL2CPP. size_t is UIntPtr, strings are byte[] + length.
using System;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeEngineOptions
    {
        public UIntPtr struct_size;
        public IntPtr model_dir;
        public UIntPtr model_dir_len;
        public uint backend;
        public uint device;
        public uint dtype;
        public uint num_threads;
        public uint builtin_model;
        public ulong synthetic_seed;
        public uint nvtx;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeModelInfo
    {
        public UIntPtr n_layer;
        public UIntPtr n_embd;
        public UIntPtr n_head;
        public UIntPtr n_positions;
        public UIntPtr vocab_size;
        public UIntPtr max_batch;
        public UIntPtr max_seq;
        public uint backend;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeSessionOptions
    {
        public UIntPtr struct_size;
        public UIntPtr max_batch;
        public UIntPtr max_seq;
        public uint kv_cache;
    }

    [StructLayout(LayoutKind.Sequential)]
    internal struct NativeGenerateOptions
    {
        public UIntPtr struct_size;
        public UIntPtr max_new_tokens;
        public SamplingOptions sampling;
        public IntPtr stop_tokens;
        public UIntPtr n_stop_tokens;
        public IntPtr callback;
        public IntPtr user_data;
    }

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate int NativeTokenCallback(IntPtr userData, UIntPtr seq, int token, IntPtr piece, UIntPtr pieceLen);

    [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
    internal delegate void NativeLogCallback(IntPtr userData, int level, IntPtr message, UIntPtr messageLen);

    internal static class Native
    {
        // "gpt2rt" resolves to gpt2rt.dll on Windows and libgpt2rt.so on Linux (Mono, .NET, Unity);
        // NativeLibraryResolver.cs adds the runtimes/<rid>/native/ layout on .NET Core 3+.
        internal const string Library = "gpt2rt";
        const CallingConvention Cdecl = CallingConvention.Cdecl;

        // Runs before the first P/Invoke of this class, so the resolver is in place in time.
        static Native()
        {
            NativeLibraryResolver.Register();
        }

        [DllImport(Library, CallingConvention = Cdecl)] internal static extern uint gpt2rt_abi_version();
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern IntPtr gpt2rt_version_string();
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern IntPtr gpt2rt_last_error_message();
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern IntPtr gpt2rt_status_name(uint status);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_set_log_callback(IntPtr callback, IntPtr userData);

        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_engine_options_default(out NativeEngineOptions options);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_engine_load(ref NativeEngineOptions options, out IntPtr engine);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern void gpt2rt_engine_destroy(IntPtr engine);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_engine_model_info(IntPtr engine, out NativeModelInfo info);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_engine_info(IntPtr engine, [Out] byte[] buffer, UIntPtr capacity, out UIntPtr length);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_engine_tokenizer(IntPtr engine, out IntPtr tokenizer);

        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_options_default(out NativeSessionOptions options);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_create(IntPtr engine, ref NativeSessionOptions options, out IntPtr session);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern void gpt2rt_session_destroy(IntPtr session);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_profile(IntPtr session, out UIntPtr maxBatch, out UIntPtr maxSeq);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_prefill(IntPtr session, int[] tokens, UIntPtr nTokens, uint[] lengths, UIntPtr batch);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_step(IntPtr session, int[] tokens, UIntPtr batch);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_batch(IntPtr session, out UIntPtr batch);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_sampling_options_default(out SamplingOptions options);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_read_logits(IntPtr session, [Out] float[] logits, UIntPtr capacity, out UIntPtr written);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_sample(IntPtr session, ref SamplingOptions sampling, [Out] int[] tokens, UIntPtr capacity, out UIntPtr count);
        [DllImport(Library, CallingConvention = Cdecl, EntryPoint = "gpt2rt_session_sample")] internal static extern Gpt2RtStatus gpt2rt_session_sample_greedy(IntPtr session, IntPtr nullSampling, [Out] int[] tokens, UIntPtr capacity, out UIntPtr count);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_generate_options_default(out NativeGenerateOptions options);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_generate(IntPtr session, byte[] prompt, UIntPtr promptLen, ref NativeGenerateOptions options, out UIntPtr nTokens, out FinishReason finish);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_generated_text(IntPtr session, [Out] byte[] buffer, UIntPtr capacity, out UIntPtr length);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_generate_tokens(IntPtr session, int[] tokens, UIntPtr nTokens, uint[] lengths, UIntPtr batch, ref NativeGenerateOptions options, [Out] int[] outTokens, UIntPtr outCapacity, [Out] UIntPtr[] outCounts, out FinishReason finish);
        // NULL options = the library's defaults (the same overloading as gpt2rt_session_sample_greedy).
        [DllImport(Library, CallingConvention = Cdecl, EntryPoint = "gpt2rt_session_generate_tokens")] internal static extern Gpt2RtStatus gpt2rt_session_generate_tokens_defaults(IntPtr session, int[] tokens, UIntPtr nTokens, uint[] lengths, UIntPtr batch, IntPtr nullOptions, [Out] int[] outTokens, UIntPtr outCapacity, [Out] UIntPtr[] outCounts, out FinishReason finish);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_session_cancel(IntPtr session);

        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_tokenizer_create_gpt2(out IntPtr tokenizer);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern void gpt2rt_tokenizer_destroy(IntPtr tokenizer);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_tokenizer_encode(IntPtr tokenizer, byte[] text, UIntPtr textLen, [Out] int[] tokens, UIntPtr capacity, out UIntPtr count);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_tokenizer_decode(IntPtr tokenizer, int[] tokens, UIntPtr nTokens, [Out] byte[] buffer, UIntPtr capacity, out UIntPtr length);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_tokenizer_vocab_size(IntPtr tokenizer, out UIntPtr size);
        [DllImport(Library, CallingConvention = Cdecl)] internal static extern Gpt2RtStatus gpt2rt_tokenizer_eos_token(IntPtr tokenizer, out int token);
    }
}
