using System;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    /// <summary>
    /// Receives each generated token: the sequence index, the id (-1 for the final flush of an
    /// incomplete character) and the text it completes (possibly empty). Return false to stop.
    /// Runs on the thread that called Generate.
    /// </summary>
    public delegate bool TokenHandler(int sequence, int token, string piece);

    public struct GenerateResult
    {
        /// <summary>The generated text (without the prompt).</summary>
        public string Text;
        public int TokenCount;
        public FinishReason FinishReason;
    }

    public struct GenerateTokensResult
    {
        /// <summary>The generated ids of each sequence.</summary>
        public int[][] Tokens;
        public FinishReason FinishReason;
    }

    /// <summary>
    /// One decode state: KV cache and buffers for a profile (gpt2rt_session). One thread at a
    /// time: a call while another thread is inside one throws SESSION_BUSY (these bindings take no
    /// lock of their own). Cancel may be called from any thread at any time.
    /// </summary>
    public sealed class Session : IDisposable
    {
        readonly SessionHandle _handle;

        [ThreadStatic] static int[] t_one;

        /// <summary>The granted profile.</summary>
        public int MaxBatch { get; private set; }
        public int MaxSeq { get; private set; }
        public int VocabSize { get; private set; }
        /// <summary>
        /// Sequences in the current batch (0 before the first prefill), as the library reports it
        /// (gpt2rt_session_batch): what Step expects and Sample returns. Set by Prefill, Generate
        /// (1) and GenerateTokens. Like every call, it throws SESSION_BUSY while another thread is
        /// inside a call on this session.
        /// </summary>
        public int Batch
        {
            get
            {
                UIntPtr batch;
                using (var h = Lease())
                    Library.Check(Native.gpt2rt_session_batch(h.Ptr, out batch));
                return Library.ToInt(batch);
            }
        }

        internal Session(SessionHandle handle, int vocabSize)
        {
            _handle = handle;
            VocabSize = vocabSize;
            UIntPtr maxBatch, maxSeq;
            try
            {
                using (var h = Lease())
                    Library.Check(Native.gpt2rt_session_profile(h.Ptr, out maxBatch, out maxSeq));
            }
            catch
            {
                handle.Dispose();
                throw;
            }
            MaxBatch = Library.ToInt(maxBatch);
            MaxSeq = Library.ToInt(maxSeq);
        }

        /// <summary>Prefills one prompt (a batch of 1).</summary>
        public void Prefill(int[] prompt)
        {
            if (prompt == null)
                throw new ArgumentNullException("prompt");
            Prefill(prompt, new[] { (uint)prompt.Length });
        }

        /// <summary>Prefills a ragged batch of prompts.</summary>
        public void Prefill(int[][] prompts)
        {
            uint[] lengths;
            int[] flat = Flatten(prompts, out lengths);
            Prefill(flat, lengths);
        }

        /// <summary>Prefills prompts stored back to back; lengths[i] is prompt i's length.</summary>
        public void Prefill(int[] tokens, uint[] lengths)
        {
            if (tokens == null)
                throw new ArgumentNullException("tokens");
            if (lengths == null)
                throw new ArgumentNullException("lengths");
            using (var h = Lease())
                Library.Check(Native.gpt2rt_session_prefill(h.Ptr, tokens, new UIntPtr((uint)tokens.Length), lengths, new UIntPtr((uint)lengths.Length)));
        }

        /// <summary>Appends one token to the single sequence of the batch (no allocation).</summary>
        public void Step(int token)
        {
            int[] one = t_one ?? (t_one = new int[1]);
            one[0] = token;
            Step(one);
        }

        /// <summary>Appends one token per sequence of the current batch.</summary>
        public void Step(int[] tokens)
        {
            if (tokens == null)
                throw new ArgumentNullException("tokens");
            using (var h = Lease())
                Library.Check(Native.gpt2rt_session_step(h.Ptr, tokens, new UIntPtr((uint)tokens.Length)));
        }

        /// <summary>The last prefill/step's logits, [Batch * VocabSize].</summary>
        public float[] ReadLogits()
        {
            // The required-size convention: (NULL, 0) gives BUFFER_TOO_SMALL with the floats
            // needed (batch * vocab), then one read into an array of exactly that size.
            using (var h = Lease())
            {
                UIntPtr needed;
                Gpt2RtStatus status = Native.gpt2rt_session_read_logits(h.Ptr, null, UIntPtr.Zero, out needed);
                if (status != Gpt2RtStatus.BufferTooSmall)
                {
                    Library.Check(status); // NOT_PREFILLED and the like throw here
                    return new float[0];
                }
                float[] logits = new float[Library.ToInt(needed)];
                UIntPtr written;
                Library.Check(Native.gpt2rt_session_read_logits(h.Ptr, logits, new UIntPtr((uint)logits.Length), out written));
                int n = Library.ToInt(written);
                if (n != logits.Length)
                    Array.Resize(ref logits, n);
                return logits;
            }
        }

        /// <summary>
        /// Copies the logits into <paramref name="destination"/>; returns the floats written (no
        /// allocation). A destination smaller than Batch * VocabSize throws BUFFER_TOO_SMALL and
        /// is left untouched; <see cref="LogitsSize"/> gives the size needed.
        /// </summary>
        public int ReadLogits(float[] destination)
        {
            if (destination == null)
                throw new ArgumentNullException("destination");
            UIntPtr written;
            using (var h = Lease())
                Library.Check(Native.gpt2rt_session_read_logits(h.Ptr, destination, new UIntPtr((uint)destination.Length), out written));
            return Library.ToInt(written);
        }

        /// <summary>
        /// The floats ReadLogits returns (Batch * VocabSize), as the library reports it through
        /// the required-size convention of gpt2rt_session_read_logits; throws NOT_PREFILLED before
        /// the first prefill.
        /// </summary>
        public int LogitsSize
        {
            get
            {
                UIntPtr needed;
                using (var h = Lease())
                {
                    Gpt2RtStatus status = Native.gpt2rt_session_read_logits(h.Ptr, null, UIntPtr.Zero, out needed);
                    if (status != Gpt2RtStatus.BufferTooSmall)
                        Library.Check(status);
                }
                return Library.ToInt(needed);
            }
        }

        /// <summary>Chooses each sequence's next token (greedy when sampling is null).</summary>
        public int[] Sample(SamplingOptions? sampling = null)
        {
            // A one-id guess (the common batch); BUFFER_TOO_SMALL reports the batch size in
            // out_count before anything is sampled, so the retry draws the same tokens.
            int[] ids = new int[1];
            using (var h = Lease())
            {
                int n;
                Gpt2RtStatus status = SampleInto(h.Ptr, ids, sampling, out n);
                if (status == Gpt2RtStatus.BufferTooSmall && n > ids.Length)
                {
                    ids = new int[n];
                    status = SampleInto(h.Ptr, ids, sampling, out n);
                }
                Library.Check(status);
                if (n != ids.Length)
                    Array.Resize(ref ids, n);
                return ids;
            }
        }

        static Gpt2RtStatus SampleInto(IntPtr session, int[] destination, SamplingOptions? sampling, out int count)
        {
            UIntPtr n;
            UIntPtr capacity = new UIntPtr((uint)destination.Length);
            Gpt2RtStatus status;
            if (sampling.HasValue)
            {
                SamplingOptions s = sampling.Value;
                status = Native.gpt2rt_session_sample(session, ref s, destination, capacity, out n);
            }
            else
            {
                status = Native.gpt2rt_session_sample_greedy(session, IntPtr.Zero, destination, capacity, out n);
            }
            count = status == Gpt2RtStatus.Ok || status == Gpt2RtStatus.BufferTooSmall ? Library.ToInt(n) : 0;
            return status;
        }

        /// <summary>
        /// Writes each sequence's next token to <paramref name="destination"/>; returns how many
        /// (no allocation). Fewer than Batch slots throws BUFFER_TOO_SMALL, nothing sampled.
        /// </summary>
        public int Sample(int[] destination, SamplingOptions? sampling = null)
        {
            if (destination == null)
                throw new ArgumentNullException("destination");
            int count;
            using (var h = Lease())
                Library.Check(SampleInto(h.Ptr, destination, sampling, out count));
            return count;
        }

        /// <summary>
        /// Encodes the prompt, generates, and returns the text. Cancel and a handler returning
        /// false are not errors: see FinishReason. An exception thrown by the handler stops the
        /// generation and is rethrown here.
        /// </summary>
        public GenerateResult Generate(string prompt, GenerateOptions options = null, TokenHandler onToken = null)
        {
            if (options == null)
                options = new GenerateOptions();
            byte[] bytes = Utf8.Bytes(prompt);
            UIntPtr count;
            FinishReason finish;
            string text;
            using (var call = new CallbackCall(options, onToken))
            {
                NativeGenerateOptions n = call.Options;
                // One lease for both calls: a Dispose from another thread meanwhile still lets
                // this call return its text.
                using (var h = Lease())
                {
                    Library.Check(Native.gpt2rt_session_generate(h.Ptr, bytes, new UIntPtr((uint)bytes.Length), ref n, out count, out finish));
                    text = ReadGeneratedText(h.Ptr);
                }
                call.RethrowHandlerError();
            }
            return new GenerateResult { Text = text, TokenCount = Library.ToInt(count), FinishReason = finish };
        }

        /// <summary>The text of the last Generate.</summary>
        public string GeneratedText()
        {
            using (var h = Lease())
                return ReadGeneratedText(h.Ptr);
        }

        static string ReadGeneratedText(IntPtr session)
        {
            return Library.ReadUtf8((byte[] buf, UIntPtr cap, out UIntPtr len) => Native.gpt2rt_session_generated_text(session, buf, cap, out len), 1024);
        }

        /// <summary>Generates from a ragged batch of token prompts.</summary>
        public GenerateTokensResult GenerateTokens(int[][] prompts, GenerateOptions options = null, TokenHandler onToken = null)
        {
            if (options == null)
                options = new GenerateOptions();
            uint[] lengths;
            int[] flat = Flatten(prompts, out lengths);
            int batch = lengths.Length;
            int perSeq = options.MaxNewTokens;
            int[] outTokens = new int[checked(batch * perSeq)];
            UIntPtr[] counts = new UIntPtr[batch];
            FinishReason finish;
            using (var call = new CallbackCall(options, onToken))
            {
                NativeGenerateOptions n = call.Options;
                using (var h = Lease())
                    Library.Check(Native.gpt2rt_session_generate_tokens(h.Ptr, flat, new UIntPtr((uint)flat.Length), lengths, new UIntPtr((uint)batch),
                        ref n, outTokens, new UIntPtr((uint)outTokens.Length), counts, out finish));
                call.RethrowHandlerError();
            }
            var tokens = new int[batch][];
            for (int i = 0; i < batch; i++)
            {
                tokens[i] = new int[Library.ToInt(counts[i])];
                Array.Copy(outTokens, i * perSeq, tokens[i], 0, tokens[i].Length);
            }
            return new GenerateTokensResult { Tokens = tokens, FinishReason = finish };
        }

        /// <summary>
        /// Asks the running generation to stop (it ends within one step with FinishReason.Cancelled).
        /// Any thread, any time, also while another thread is inside a call on this session. A
        /// Cancel while no generation runs is kept: the next Generate/GenerateTokens ends before its
        /// first step (Cancelled, 0 tokens), so a cancel racing with the start of a generation is
        /// never lost. A generation that passes its argument checks clears the request when it returns.
        /// </summary>
        public void Cancel()
        {
            using (var h = Lease())
                Library.Check(Native.gpt2rt_session_cancel(h.Ptr));
        }

        /// <summary>
        /// Releases the session. From another thread during a call, the native session is destroyed
        /// when that call returns (SafeHandle reference count), never under it.
        /// </summary>
        public void Dispose()
        {
            _handle.Dispose();
        }

        HandleLease Lease()
        {
            return new HandleLease(_handle, "Session");
        }

        static int[] Flatten(int[][] prompts, out uint[] lengths)
        {
            if (prompts == null)
                throw new ArgumentNullException("prompts");
            lengths = new uint[prompts.Length];
            int total = 0;
            for (int i = 0; i < prompts.Length; i++)
            {
                if (prompts[i] == null)
                    throw new ArgumentNullException("prompts", "prompt " + i + " is null");
                lengths[i] = (uint)prompts[i].Length;
                total += prompts[i].Length;
            }
            int[] flat = new int[total];
            int at = 0;
            foreach (int[] p in prompts)
            {
                Array.Copy(p, 0, flat, at, p.Length);
                at += p.Length;
            }
            return flat;
        }
    }

    /// <summary>
    /// The native side of one generate call: the stop tokens pinned, and the managed handler
    /// reached through ONE static callback plus user_data (a GCHandle), which is what IL2CPP
    /// supports (no delegates to instance methods handed to native code).
    /// </summary>
    internal struct CallbackCall : IDisposable
    {
        static readonly NativeTokenCallback s_callback = OnToken;
        static readonly IntPtr s_callbackPtr = Marshal.GetFunctionPointerForDelegate(s_callback);

        sealed class Target
        {
            internal TokenHandler Handler;
            internal Exception Error;
        }

        GCHandle _target;
        GCHandle _stops;
        internal NativeGenerateOptions Options;

        internal CallbackCall(GenerateOptions options, TokenHandler handler)
        {
            _target = default(GCHandle);
            _stops = default(GCHandle);
            Options = default(NativeGenerateOptions);
            IntPtr stops = IntPtr.Zero;
            if (options.StopTokens != null && options.StopTokens.Length > 0)
            {
                _stops = GCHandle.Alloc(options.StopTokens, GCHandleType.Pinned);
                stops = _stops.AddrOfPinnedObject();
            }
            IntPtr userData = IntPtr.Zero;
            if (handler != null)
            {
                _target = GCHandle.Alloc(new Target { Handler = handler });
                userData = GCHandle.ToIntPtr(_target);
            }
            try
            {
                Options = options.ToNative(stops, handler == null ? IntPtr.Zero : s_callbackPtr, userData);
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        internal void RethrowHandlerError()
        {
            if (!_target.IsAllocated)
                return;
            Exception error = ((Target)_target.Target).Error;
            if (error != null)
                ExceptionDispatchInfo.Capture(error).Throw();
        }

        public void Dispose()
        {
            if (_target.IsAllocated)
                _target.Free();
            if (_stops.IsAllocated)
                _stops.Free();
        }

        [AOT.MonoPInvokeCallback(typeof(NativeTokenCallback))]
        static int OnToken(IntPtr userData, UIntPtr seq, int token, IntPtr piece, UIntPtr pieceLen)
        {
            var target = (Target)GCHandle.FromIntPtr(userData).Target;
            try
            {
                return target.Handler(Library.ToInt(seq), token, Utf8.FromNative(piece, pieceLen)) ? 0 : 1;
            }
            catch (Exception e)
            {
                // Exceptions must not unwind through native frames: stop, and rethrow on return.
                target.Error = e;
                return 1;
            }
        }
    }
}
