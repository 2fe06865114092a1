using System;

namespace Gpt2Rt
{
    /// <summary>GPT-2 byte-level BPE (gpt2rt_tokenizer). Thread-safe: any thread, concurrently.</summary>
    public sealed class Tokenizer : IDisposable
    {
        readonly TokenizerHandle _handle;

        internal Tokenizer(TokenizerHandle handle)
        {
            _handle = handle;
        }

        /// <summary>The built-in GPT-2 tokenizer (no model needed).</summary>
        public static Tokenizer CreateGpt2()
        {
            Library.EnsureCompatible();
            IntPtr raw;
            Library.Check(Native.gpt2rt_tokenizer_create_gpt2(out raw));
            return new Tokenizer(new TokenizerHandle(raw));
        }

        public int[] Encode(string text)
        {
            byte[] bytes = Utf8.Bytes(text);
            // A byte-level BPE token covers at least one byte, so this guess is normally enough;
            // the required-size convention covers the rest.
            int[] ids = new int[bytes.Length];
            for (int attempt = 0; ; attempt++)
            {
                UIntPtr count;
                using (var h = Lease())
                {
                    Gpt2RtStatus status = Native.gpt2rt_tokenizer_encode(h.Ptr, bytes, new UIntPtr((uint)bytes.Length), ids, new UIntPtr((uint)ids.Length), out count);
                    int n = Library.ToInt(count);
                    if (status == Gpt2RtStatus.BufferTooSmall && n > ids.Length && attempt < 2)
                    {
                        ids = new int[n];
                        continue;
                    }
                    Library.Check(status);
                    if (n != ids.Length)
                        Array.Resize(ref ids, n);
                    return ids;
                }
            }
        }

        public string Decode(int[] tokens)
        {
            return Decode(tokens, tokens == null ? 0 : tokens.Length);
        }

        /// <summary>Decodes the first <paramref name="count"/> ids (lets a caller reuse one growing array).</summary>
        public string Decode(int[] tokens, int count)
        {
            if (tokens == null)
                tokens = new int[0];
            if (count < 0 || count > tokens.Length)
                throw new ArgumentOutOfRangeException("count", count, "count must be within the array");
            UIntPtr n = new UIntPtr((uint)count);
            using (var h = Lease())
            {
                IntPtr ptr = h.Ptr;
                return Library.ReadUtf8((byte[] buf, UIntPtr cap, out UIntPtr len) => Native.gpt2rt_tokenizer_decode(ptr, tokens, n, buf, cap, out len), 16 + 8 * count);
            }
        }

        /// <summary>Vocabulary size, including added tokens such as &lt;|endoftext|&gt;.</summary>
        public int VocabSize
        {
            get
            {
                UIntPtr size;
                using (var h = Lease())
                    Library.Check(Native.gpt2rt_tokenizer_vocab_size(h.Ptr, out size));
                return Library.ToInt(size);
            }
        }

        /// <summary>The id of &lt;|endoftext|&gt;.</summary>
        public int EosToken
        {
            get
            {
                int id;
                using (var h = Lease())
                    Library.Check(Native.gpt2rt_tokenizer_eos_token(h.Ptr, out id));
                return id;
            }
        }

        public void Dispose()
        {
            _handle.Dispose();
        }

        HandleLease Lease()
        {
            return new HandleLease(_handle, "Tokenizer");
        }
    }
}
