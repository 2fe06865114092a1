using System;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    /// <summary>
    /// Model weights on a backend (gpt2rt_engine). Thread-safe: any thread, concurrently.
    /// Sessions created from it keep what they need alive, so it may be disposed before them.
    /// </summary>
    public sealed class Engine : IDisposable
    {
        readonly EngineHandle _handle;
        readonly object _lock = new object();
        Tokenizer _tokenizer;

        /// <summary>Model dimensions and limits, read once at load.</summary>
        public ModelInfo Info { get; private set; }

        Engine(EngineHandle handle)
        {
            _handle = handle;
            NativeModelInfo n;
            using (var h = Lease())
                Library.Check(Native.gpt2rt_engine_model_info(h.Ptr, out n));
            Info = new ModelInfo
            {
                NLayer = Library.ToInt(n.n_layer),
                NEmbd = Library.ToInt(n.n_embd),
                NHead = Library.ToInt(n.n_head),
                NPositions = Library.ToInt(n.n_positions),
                VocabSize = Library.ToInt(n.vocab_size),
                MaxBatch = Library.ToInt(n.max_batch),
                MaxSeq = Library.ToInt(n.max_seq),
                Backend = (Backend)n.backend,
            };
        }

        /// <summary>Loads an engine; null options = the library's defaults.</summary>
        public static Engine Load(EngineOptions options = null)
        {
            Library.EnsureCompatible();
            if (options == null)
                options = new EngineOptions();
            byte[] dir = Utf8.Bytes(options.ModelDir);
            GCHandle pin = GCHandle.Alloc(dir, GCHandleType.Pinned);
            IntPtr raw;
            try
            {
                NativeEngineOptions n = options.ToNative(dir.Length == 0 ? IntPtr.Zero : pin.AddrOfPinnedObject(), dir.Length);
                Library.Check(Native.gpt2rt_engine_load(ref n, out raw));
            }
            finally
            {
                pin.Free();
            }
            var handle = new EngineHandle(raw);
            try
            {
                return new Engine(handle);
            }
            catch
            {
                handle.Dispose();
                throw;
            }
        }

        /// <summary>Model, backend, and why other backends were skipped (gpt2rt_engine_info).</summary>
        public string Description
        {
            get
            {
                using (var h = Lease())
                {
                    IntPtr ptr = h.Ptr;
                    return Library.ReadUtf8((byte[] buf, UIntPtr cap, out UIntPtr len) => Native.gpt2rt_engine_info(ptr, buf, cap, out len), 256);
                }
            }
        }

        /// <summary>The engine's tokenizer, created on first use and disposed with the engine.</summary>
        public Tokenizer Tokenizer
        {
            get
            {
                lock (_lock)
                {
                    if (_tokenizer == null)
                    {
                        IntPtr raw;
                        using (var h = Lease())
                            Library.Check(Native.gpt2rt_engine_tokenizer(h.Ptr, out raw));
                        _tokenizer = new Tokenizer(new TokenizerHandle(raw));
                    }
                    return _tokenizer;
                }
            }
        }

        /// <summary>
        /// Creates a session with a profile (null = defaults: batch 1, the model's n_positions).
        /// A profile outside Info's limits throws PROFILE_UNSUPPORTED.
        /// </summary>
        public Session CreateSession(SessionOptions options = null)
        {
            if (options == null)
                options = new SessionOptions();
            NativeSessionOptions n = options.ToNative();
            IntPtr raw;
            using (var h = Lease())
                Library.Check(Native.gpt2rt_session_create(h.Ptr, ref n, out raw));
            return new Session(new SessionHandle(raw), Info.VocabSize);
        }

        public void Dispose()
        {
            lock (_lock)
            {
                if (_tokenizer != null)
                    _tokenizer.Dispose();
            }
            _handle.Dispose();
        }

        HandleLease Lease()
        {
            return new HandleLease(_handle, "Engine");
        }
    }
}
