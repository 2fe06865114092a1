// Friendly options classes. Each starts from the library's own *_default() values and converts
// to the exact C mirror (Native.cs) with struct_size as the library reported it.
using System;

namespace Gpt2Rt
{
    /// <summary>Options of Engine.Load (gpt2rt_engine_options).</summary>
    public sealed class EngineOptions
    {
        /// <summary>Hugging Face GPT-2 directory; null or empty = the built-in synthetic model.</summary>
        public string ModelDir;
        public Backend Backend;
        /// <summary>GPU ordinal for device backends.</summary>
        public uint Device;
        public ComputeDType DType;
        /// <summary>CPU worker threads; 0 = one per core.</summary>
        public uint NumThreads;
        public BuiltinModel BuiltinModel;
        public ulong SyntheticSeed;
        /// <summary>Emit NVTX ranges for Nsight Systems (process-wide once on; GPT2RT_NVTX=1 does the same).</summary>
        public bool Nvtx;

        readonly UIntPtr _structSize;

        /// <summary>The library's defaults (built-in DistilGPT2 shapes, auto backend).</summary>
        public EngineOptions()
        {
            Library.EnsureCompatible();
            NativeEngineOptions d;
            Library.Check(Native.gpt2rt_engine_options_default(out d));
            _structSize = d.struct_size;
            Backend = (Backend)d.backend;
            Device = d.device;
            DType = (ComputeDType)d.dtype;
            NumThreads = d.num_threads;
            BuiltinModel = (BuiltinModel)d.builtin_model;
            SyntheticSeed = d.synthetic_seed;
            Nvtx = d.nvtx != 0;
        }

        /// <summary>The C struct; model_dir points into <paramref name="pinnedModelDir"/>, pinned by the caller.</summary>
        internal NativeEngineOptions ToNative(IntPtr pinnedModelDir, int modelDirLength)
        {
            NativeEngineOptions n;
            n.struct_size = _structSize;
            n.model_dir = pinnedModelDir;
            n.model_dir_len = new UIntPtr((uint)modelDirLength);
            n.backend = (uint)Backend;
            n.device = Device;
            n.dtype = (uint)DType;
            n.num_threads = NumThreads;
            n.builtin_model = (uint)BuiltinModel;
            n.synthetic_seed = SyntheticSeed;
            n.nvtx = Nvtx ? 1u : 0u;
            return n;
        }
    }

    /// <summary>Options of Engine.CreateSession (gpt2rt_session_options): the profile.</summary>
    public sealed class SessionOptions
    {
        /// <summary>Most sequences decoded together.</summary>
        public int MaxBatch;
        /// <summary>Longest sequence, prompt + generated; 0 = the model's n_positions.</summary>
        public int MaxSeq;
        /// <summary>True: KV cache. False: recompute the whole sequence every step.</summary>
        public bool KvCache;

        readonly UIntPtr _structSize;

        public SessionOptions()
        {
            Library.EnsureCompatible();
            NativeSessionOptions d;
            Library.Check(Native.gpt2rt_session_options_default(out d));
            _structSize = d.struct_size;
            MaxBatch = Library.ToInt(d.max_batch);
            MaxSeq = Library.ToInt(d.max_seq);
            KvCache = d.kv_cache != 0;
        }

        internal NativeSessionOptions ToNative()
        {
            NativeSessionOptions n;
            n.struct_size = _structSize;
            n.max_batch = Library.Size(MaxBatch, "MaxBatch");
            n.max_seq = Library.Size(MaxSeq, "MaxSeq");
            n.kv_cache = KvCache ? 1u : 0u;
            return n;
        }
    }

    /// <summary>Options of Session.Generate / GenerateTokens (gpt2rt_generate_options).</summary>
    public sealed class GenerateOptions
    {
        /// <summary>Tokens to generate per sequence.</summary>
        public int MaxNewTokens;
        public SamplingOptions Sampling;
        /// <summary>Tokens that end a sequence (not part of the output); null = none.</summary>
        public int[] StopTokens;

        readonly UIntPtr _structSize;

        /// <summary>The library's defaults (32 new tokens, greedy, no stop tokens).</summary>
        public GenerateOptions()
        {
            Library.EnsureCompatible();
            NativeGenerateOptions d;
            Library.Check(Native.gpt2rt_generate_options_default(out d));
            _structSize = d.struct_size;
            MaxNewTokens = Library.ToInt(d.max_new_tokens);
            Sampling = d.sampling;
        }

        /// <summary>The C struct; stop_tokens must already be pinned by the caller.</summary>
        internal NativeGenerateOptions ToNative(IntPtr pinnedStopTokens, IntPtr callback, IntPtr userData)
        {
            NativeGenerateOptions n;
            n.struct_size = _structSize;
            n.max_new_tokens = Library.Size(MaxNewTokens, "MaxNewTokens");
            n.sampling = Sampling;
            n.stop_tokens = pinnedStopTokens;
            n.n_stop_tokens = new UIntPtr((uint)(StopTokens == null ? 0 : StopTokens.Length));
            n.callback = callback;
            n.user_data = userData;
            return n;
        }
    }
}
