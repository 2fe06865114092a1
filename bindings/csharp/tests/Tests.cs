// Tests of the C# bindings against the real Linux library, run with mono by tools/test_csharp.sh.
// Usage: mono Gpt2Rt.Tests.exe EXPECTED.tsv
// EXPECTED.tsv holds what the Rust CLI printed (`gpt2rt generate --print-tokens`), one line each:
//   max_new_tokens <TAB> N
//   greedy|sampled|batch <TAB> prompt <TAB> space-separated ids
// The last line printed is "N passed, N failed"; the exit code is non-zero on any failure.
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;
using Gpt2Rt;

static class Tests
{
    static int s_passed, s_failed;
    static int s_maxNew = 16;
    static readonly List<KeyValuePair<string, int[]>> s_greedy = new List<KeyValuePair<string, int[]>>();
    static readonly List<KeyValuePair<string, int[]>> s_sampled = new List<KeyValuePair<string, int[]>>();
    static readonly List<KeyValuePair<string, int[]>> s_batch = new List<KeyValuePair<string, int[]>>();
    // The CLI flags the test script uses for the "sampled" lines.
    static readonly SamplingOptions s_cliSampling = new SamplingOptions { Temperature = 0.8f, TopK = 40, TopP = 0.95f, Seed = 7 };
    static readonly TimeSpan s_wait = TimeSpan.FromSeconds(60);

    static int Main(string[] args)
    {
        if (args.Length != 1)
        {
            Console.Error.WriteLine("usage: Gpt2Rt.Tests.exe EXPECTED.tsv");
            return 2;
        }
        ReadExpected(args[0]);

        Run("library version, ABI and struct layouts", LibraryBasics);
        Run("bad struct: the startup layout check", BadStructManaged);
        Run("bad struct: the library refuses a wrong struct_size", BadStructNative);
        Run("NULL pointer and invalid UTF-8 reach the library as statuses", NullAndUtf8);

        using (Engine engine = LoadTiny())
        {
            Run("engine info and tokenizer basics", () => EngineAndTokenizer(engine));
            Run("prefill + sample + step equals the Rust CLI (greedy)", () => StepLoopMatchesCli(engine));
            Run("Generate(text) with a callback equals the Rust CLI (greedy)", () => GenerateMatchesCli(engine));
            Run("GenerateTokens with sampling equals the Rust CLI (seeded)", () => SampledMatchesCli(engine));
            Run("GenerateTokens on a ragged batch equals the Rust CLI", () => BatchMatchesCli(engine));
            Run("ReadLogits: size, argmax = greedy sample, caller buffer too small", () => Logits(engine));
            Run("generate_tokens with NULL options = the defaults", () => GenerateTokensNullOptions(engine));
            Run("buffer too small handled inside the wrappers", () => BufferTooSmallInternally(engine));
            Run("token out of range", () => TokenOutOfRange(engine));
            Run("step / read_logits / sample before prefill", () => NotPrefilled(engine));
            Run("invalid profile, batch and sequence beyond the profile, wrong step count", () => ProfileErrors(engine));
            Run("invalid sampling options and negative sizes", () => InvalidArguments(engine));
            Run("stop tokens, a handler returning false, a handler throwing", () => StopsAndHandlers(engine));
            Run("cancellation from another thread", () => CancelFromAnotherThread(engine));
            Run("session used from two threads -> SESSION_BUSY", () => SessionBusy(engine));
            Run("Dispose from another thread during a call waits for the call", () => DisposeDuringCall(engine));
        }
        Run("engine load errors: backend unavailable, missing model directory", LoadErrors);
        Run("disposed handles; engine disposed before its session", DisposedHandles);
        Run("log handler (static callback, any thread)", LogHandlerWorks);

        Console.WriteLine("{0} passed, {1} failed", s_passed, s_failed);
        return s_failed == 0 ? 0 : 1;
    }

    // ---------------------------------------------------------------- tests

    static void LibraryBasics()
    {
        Library.EnsureCompatible();
        Equal(Library.ExpectedAbiVersion, Library.AbiVersion, "ABI version");
        True(Library.Version.Length > 0 && Library.Version.Split('.').Length == 3, "version string " + Library.Version);
        Equal("GPT2RT_STATUS_SESSION_BUSY", Library.StatusName(Gpt2RtStatus.SessionBusy), "status name");
        Equal(64, Marshal.SizeOf(typeof(NativeEngineOptions)), "engine options size on x64");
        Equal(32, Marshal.SizeOf(typeof(NativeSessionOptions)), "session options size on x64");
        Equal(72, Marshal.SizeOf(typeof(NativeGenerateOptions)), "generate options size on x64");
        Equal(24, Marshal.SizeOf(typeof(SamplingOptions)), "sampling options size");
        SamplingOptions greedy = SamplingOptions.Greedy;
        Equal(0f, greedy.Temperature, "default temperature (greedy)");
        // gpt2rt_sampling_options_default: temperature 0, top_k 0, top_p 1, seed 0; the same as
        // the sampling inside gpt2rt_generate_options_default.
        SamplingOptions raw;
        Equal(Gpt2RtStatus.Ok, Native.gpt2rt_sampling_options_default(out raw), "sampling_options_default status");
        SamplingOptions d = SamplingOptions.Default;
        Equal(0f, d.Temperature, "Default.Temperature");
        Equal(0u, d.TopK, "Default.TopK");
        Equal(1f, d.TopP, "Default.TopP");
        Equal(0UL, d.Seed, "Default.Seed");
        Equal(raw, d, "Default is the native default");
        Equal(d, greedy, "Greedy is Default");
        Equal(d, new GenerateOptions().Sampling, "GenerateOptions.Sampling starts from the same values");
        Equal(1f, greedy.TopP, "default top_p");
        var go = new GenerateOptions();
        Equal(32, go.MaxNewTokens, "default max_new_tokens");
    }

    static void BadStructManaged()
    {
        var e = Throws<Gpt2RtException>(() => Library.CheckLayout("gpt2rt_engine_options", 48, new UIntPtr(56)));
        Equal(Gpt2RtStatus.StructSize, e.Status, "status");
        Contains(e.Message, "GPT2RT_STATUS_STRUCT_SIZE");
        Contains(e.Message, "the C# mirror is 48 bytes but the library's struct_size is 56");
    }

    static void BadStructNative()
    {
        NativeEngineOptions eo;
        Library.Check(Native.gpt2rt_engine_options_default(out eo));
        // 48: no layout of the struct (56 is the one before `nvtx`, 64 the current one).
        eo.struct_size = new UIntPtr(eo.struct_size.ToUInt64() - 16);
        IntPtr engine;
        var e = Throws<Gpt2RtException>(() => Library.Check(Native.gpt2rt_engine_load(ref eo, out engine)));
        Equal(Gpt2RtStatus.StructSize, e.Status, "engine_load status");
        Contains(e.NativeMessage, "gpt2rt_engine_options.struct_size is 48");
        Contains(e.NativeMessage, "expects 56 or 64");

        NativeGenerateOptions go;
        Library.Check(Native.gpt2rt_generate_options_default(out go));
        go.struct_size = new UIntPtr(1000);
        using (Engine en = LoadTiny())
        using (Session s = en.CreateSession())
        {
            IntPtr raw = Raw(s);
            UIntPtr n;
            FinishReason f;
            byte[] prompt = Encoding.UTF8.GetBytes("Hi");
            var e2 = Throws<Gpt2RtException>(() => Library.Check(Native.gpt2rt_session_generate(raw, prompt, new UIntPtr(2), ref go, out n, out f)));
            Equal(Gpt2RtStatus.StructSize, e2.Status, "generate status");
            Contains(e2.NativeMessage, "gpt2rt_generate_options.struct_size is 1000");
        }
    }

    static void NullAndUtf8()
    {
        using (Tokenizer t = Tokenizer.CreateGpt2())
        {
            IntPtr raw = Raw(t);
            UIntPtr count;
            var e = Throws<Gpt2RtException>(() => Library.Check(Native.gpt2rt_tokenizer_encode(raw, null, new UIntPtr(5), null, UIntPtr.Zero, out count)));
            Equal(Gpt2RtStatus.NullPointer, e.Status, "status");
            Contains(e.NativeMessage, "text is NULL but its length is 5");
            byte[] bad = { 0x48, 0xff, 0xfe };
            e = Throws<Gpt2RtException>(() => Library.Check(Native.gpt2rt_tokenizer_encode(raw, bad, new UIntPtr(3), new int[8], new UIntPtr(8), out count)));
            Equal(Gpt2RtStatus.InvalidUtf8, e.Status, "status");
            Contains(e.NativeMessage, "text is not valid UTF-8");
            // The message belongs to the failing call's thread: another thread sees its own ("").
            string other = null;
            var th = new Thread(() => other = Library.LastErrorMessage());
            th.Start();
            th.Join();
            Equal("", other, "last error of a thread that had no failure");
        }
    }

    static void EngineAndTokenizer(Engine engine)
    {
        ModelInfo info = engine.Info;
        Equal(2, info.NLayer, "n_layer of tiny");
        Equal(64, info.NEmbd, "n_embd of tiny");
        Equal(50257, info.VocabSize, "vocab");
        Equal(Backend.Cpu, info.Backend, "backend");
        True(info.MaxBatch >= 1 && info.MaxSeq >= 1, "limits");
        Contains(engine.Description, "cpu");
        True(!engine.Description.EndsWith("\n"), "engine info no longer ends with a newline");
        Tokenizer tok = engine.Tokenizer;
        True(ReferenceEquals(tok, engine.Tokenizer), "the engine's tokenizer is cached");
        Equal(50257, tok.VocabSize, "tokenizer vocab");
        Equal(50256, tok.EosToken, "eos");
        SeqEqual(new[] { 15496, 11, 616, 1438, 318 }, tok.Encode("Hello, my name is"), "encode (the README's ids)");
        Equal(0, tok.Encode("").Length, "empty text");
        foreach (string text in new[] { "Hello, my name is", "Grüße, 世界 🌍 — ça va?", "" })
            Equal(text, tok.Decode(tok.Encode(text)), "round trip");
        using (Tokenizer own = Tokenizer.CreateGpt2())
            SeqEqual(tok.Encode("Grüße 🌍"), own.Encode("Grüße 🌍"), "built-in tokenizer equals the engine's");
    }

    static void StepLoopMatchesCli(Engine engine)
    {
        foreach (var c in s_greedy)
        {
            int[] prompt = engine.Tokenizer.Encode(c.Key);
            using (Session s = engine.CreateSession(Profile(1, prompt.Length + s_maxNew)))
            {
                s.Prefill(prompt);
                Equal(1, s.Batch, "batch after prefill");
                var got = new List<int>();
                int[] next = new int[1];
                for (int i = 0; i < s_maxNew; i++)
                {
                    Equal(1, s.Sample(next), "sampled count");
                    got.Add(next[0]);
                    if (i + 1 < s_maxNew)
                        s.Step(next[0]);
                }
                SeqEqual(c.Value, got.ToArray(), "tokens for \"" + c.Key + "\"");
            }
        }
    }

    static void GenerateMatchesCli(Engine engine)
    {
        foreach (var c in s_greedy)
        {
            using (Session s = engine.CreateSession(Profile(1, 0)))
            {
                var ids = new List<int>();
                var pieces = new StringBuilder();
                GenerateResult r = s.Generate(c.Key, Options(s_maxNew), (seq, token, piece) =>
                {
                    Equal(0, seq, "sequence index");
                    if (token >= 0)
                        ids.Add(token);
                    pieces.Append(piece);
                    return true;
                });
                SeqEqual(c.Value, ids.ToArray(), "streamed tokens for \"" + c.Key + "\"");
                Equal(s_maxNew, r.TokenCount, "token count");
                Equal(FinishReason.Length, r.FinishReason, "finish");
                Equal(pieces.ToString(), r.Text, "pieces add up to the text");
                Equal(engine.Tokenizer.Decode(c.Value), r.Text, "text equals the decoded CLI tokens");
                Equal(r.Text, s.GeneratedText(), "GeneratedText");
            }
        }
    }

    static void SampledMatchesCli(Engine engine)
    {
        True(s_sampled.Count > 0, "expected sampled cases");
        foreach (var c in s_sampled)
        {
            using (Session s = engine.CreateSession(Profile(1, 0)))
            {
                GenerateOptions o = Options(s_maxNew);
                o.Sampling = s_cliSampling;
                GenerateTokensResult r = s.GenerateTokens(new[] { engine.Tokenizer.Encode(c.Key) }, o);
                SeqEqual(c.Value, r.Tokens[0], "sampled tokens for \"" + c.Key + "\"");
                // The same seed gives the same stream through prefill + Sample too.
                s.Prefill(engine.Tokenizer.Encode(c.Key));
                Equal(c.Value[0], s.Sample(s_cliSampling)[0], "first sampled token via Sample");
            }
        }
    }

    static void BatchMatchesCli(Engine engine)
    {
        True(s_batch.Count >= 2, "expected a batch of at least 2");
        int[][] prompts = s_batch.Select(c => engine.Tokenizer.Encode(c.Key)).ToArray();
        using (Session s = engine.CreateSession(Profile(prompts.Length, 0)))
        {
            var perSeq = new int[prompts.Length];
            GenerateTokensResult r = s.GenerateTokens(prompts, Options(s_maxNew), (seq, token, piece) => { perSeq[seq]++; return true; });
            for (int i = 0; i < prompts.Length; i++)
            {
                SeqEqual(s_batch[i].Value, r.Tokens[i], "batch sequence " + i);
                Equal(s_maxNew, perSeq[i], "callbacks of sequence " + i);
            }
            // The same through the step API on the ragged batch.
            s.Prefill(prompts);
            Equal(prompts.Length, s.Batch, "batch");
            var got = prompts.Select(_ => new List<int>()).ToArray();
            for (int step = 0; step < s_maxNew; step++)
            {
                int[] next = s.Sample();
                Equal(prompts.Length, next.Length, "one id per sequence");
                for (int i = 0; i < next.Length; i++)
                    got[i].Add(next[i]);
                if (step + 1 < s_maxNew)
                    s.Step(next);
            }
            for (int i = 0; i < prompts.Length; i++)
                SeqEqual(s_batch[i].Value, got[i].ToArray(), "step loop, batch sequence " + i);
        }
    }

    static void Logits(Engine engine)
    {
        int vocab = engine.Info.VocabSize;
        using (Session s = engine.CreateSession(Profile(2, 64)))
        {
            s.Prefill(engine.Tokenizer.Encode("Hello, my name is"));
            float[] logits = s.ReadLogits();
            Equal(vocab, logits.Length, "batch 1 logits");
            Equal(Argmax(logits, 0, vocab), s.Sample()[0], "argmax equals the greedy sample");

            s.Prefill(new[] { new[] { 1, 2, 3 }, new[] { 4 } });
            logits = s.ReadLogits();
            Equal(2 * vocab, logits.Length, "batch 2 logits");
            int[] greedy = s.Sample();
            Equal(Argmax(logits, 0, vocab), greedy[0], "argmax row 0");
            Equal(Argmax(logits, vocab, vocab), greedy[1], "argmax row 1");

            float[] reused = new float[2 * vocab + 7];
            Equal(2 * vocab, s.ReadLogits(reused), "into a caller buffer");
            var e = Throws<Gpt2RtException>(() => s.ReadLogits(new float[vocab]));
            Equal(Gpt2RtStatus.BufferTooSmall, e.Status, "caller buffer too small");
            Contains(e.NativeMessage, "logits need " + (2 * vocab) + " floats");

            // The required-size convention: BUFFER_TOO_SMALL reports batch * vocab.
            UIntPtr written = new UIntPtr(12345);
            Gpt2RtStatus st = Native.gpt2rt_session_read_logits(Raw(s), null, UIntPtr.Zero, out written);
            Equal(Gpt2RtStatus.BufferTooSmall, st, "raw status");
            Equal((ulong)(2 * vocab), written.ToUInt64(), "read_logits reports the size it needs");
            // Also with a real buffer one float short: the size is reported, the buffer untouched.
            float[] shortBuf = Enumerable.Repeat(-7f, 2 * vocab - 1).ToArray();
            written = new UIntPtr(12345);
            st = Native.gpt2rt_session_read_logits(Raw(s), shortBuf, new UIntPtr((uint)shortBuf.Length), out written);
            Equal(Gpt2RtStatus.BufferTooSmall, st, "raw status, one float short");
            Equal((ulong)(2 * vocab), written.ToUInt64(), "size reported, one float short");
            True(shortBuf.All(x => x == -7f), "a buffer that is too small is left untouched");
            Equal(2 * vocab, s.LogitsSize, "LogitsSize");
            // sample: BUFFER_TOO_SMALL reports the batch in out_count, before anything is sampled.
            UIntPtr count = new UIntPtr(12345);
            int[] one = { -1 };
            st = Native.gpt2rt_session_sample_greedy(Raw(s), IntPtr.Zero, one, new UIntPtr(1), out count);
            Equal(Gpt2RtStatus.BufferTooSmall, st, "sample into 1 slot for a batch of 2");
            Equal(2UL, count.ToUInt64(), "sample reports the batch size");
            Equal(-1, one[0], "sample's buffer untouched");
            e = Throws<Gpt2RtException>(() => s.Sample(new int[1]));
            Equal(Gpt2RtStatus.BufferTooSmall, e.Status, "Sample(int[1]) on a batch of 2");
            SeqEqual(greedy, s.Sample(), "Sample() sized from the reported batch");
            UIntPtr batch;
            Equal(Gpt2RtStatus.Ok, Native.gpt2rt_session_batch(Raw(s), out batch), "session_batch");
            Equal(2UL, batch.ToUInt64(), "current batch");
            Equal(2, s.Batch, "Session.Batch reads gpt2rt_session_batch");
            s.Generate("Hi", Options(2));
            Equal(1, s.Batch, "Generate leaves a batch of 1");
            s.GenerateTokens(new[] { new[] { 1 }, new[] { 2, 3 } }, Options(2));
            Equal(2, s.Batch, "GenerateTokens leaves its batch");
            SamplingOptions defaults = SamplingOptions.Greedy;
            Equal(0f, defaults.Temperature, "default temperature");
            Equal(1f, defaults.TopP, "default top_p");
        }
    }

    static void GenerateTokensNullOptions(Engine engine)
    {
        var c = s_greedy[0];
        int[] prompt = engine.Tokenizer.Encode(c.Key);
        int maxNew = new GenerateOptions().MaxNewTokens; // the default, 32
        using (Session s = engine.CreateSession(Profile(1, 0)))
        {
            int[] outTokens = new int[maxNew];
            UIntPtr[] counts = new UIntPtr[1];
            FinishReason finish;
            Library.Check(Native.gpt2rt_session_generate_tokens_defaults(Raw(s), prompt, new UIntPtr((uint)prompt.Length),
                new[] { (uint)prompt.Length }, new UIntPtr(1), IntPtr.Zero, outTokens, new UIntPtr((uint)outTokens.Length), counts, out finish));
            Equal(FinishReason.Length, finish, "finish");
            Equal((ulong)maxNew, counts[0].ToUInt64(), "default max_new_tokens produced");
            SeqEqual(c.Value, outTokens.Take(c.Value.Length).ToArray(), "greedy: begins with the CLI's tokens");
            SeqEqual(s.GenerateTokens(new[] { prompt }).Tokens[0], outTokens, "equals GenerateTokens with default options");
            // The defaults need batch * 32 slots.
            var e = Throws<Gpt2RtException>(() => Library.Check(Native.gpt2rt_session_generate_tokens_defaults(Raw(s), prompt,
                new UIntPtr((uint)prompt.Length), new[] { (uint)prompt.Length }, new UIntPtr(1), IntPtr.Zero, new int[4], new UIntPtr(4), counts, out finish)));
            Equal(Gpt2RtStatus.BufferTooSmall, e.Status, "NULL options still need batch * 32 slots");
        }
    }

    static void BufferTooSmallInternally(Engine engine)
    {
        Tokenizer tok = engine.Tokenizer;
        // Long tokens decode to far more bytes than the wrapper's first guess (16 + 8 per token).
        string text = string.Concat(Enumerable.Repeat("--------------------------------================", 200));
        int[] ids = tok.Encode(text);
        True(text.Length > 16 + 8 * ids.Length, "the text outgrows the first guess (" + ids.Length + " ids)");
        Equal(text, tok.Decode(ids), "decoded after the retry");

        // The convention the wrapper relies on: the size needed is written with BUFFER_TOO_SMALL.
        UIntPtr len;
        Gpt2RtStatus st = Native.gpt2rt_tokenizer_decode(Raw(tok), ids, new UIntPtr((uint)ids.Length), new byte[1], new UIntPtr(1), out len);
        Equal(Gpt2RtStatus.BufferTooSmall, st, "raw status");
        Equal((ulong)Encoding.UTF8.GetByteCount(text), len.ToUInt64(), "required size written");

        using (Session s = engine.CreateSession(Profile(1, 0)))
        {
            GenerateResult r = s.Generate(new string('x', 3000), Options(4));
            Equal(r.Text, s.GeneratedText(), "generated text");
            UIntPtr need;
            Equal(Gpt2RtStatus.BufferTooSmall, Native.gpt2rt_session_generated_text(Raw(s), null, UIntPtr.Zero, out need), "(NULL, 0) asks the size");
            Equal((ulong)Encoding.UTF8.GetByteCount(r.Text), need.ToUInt64(), "size of the generated text");
        }
        UIntPtr infoLen;
        Equal(Gpt2RtStatus.BufferTooSmall, Native.gpt2rt_engine_info(Raw(engine), null, UIntPtr.Zero, out infoLen), "engine info size query");
        Equal((ulong)Encoding.UTF8.GetByteCount(engine.Description), infoLen.ToUInt64(), "engine description complete");
    }

    static void TokenOutOfRange(Engine engine)
    {
        using (Session s = engine.CreateSession(Profile(1, 32)))
        {
            var e = Throws<Gpt2RtException>(() => s.Prefill(new[] { 1, 50257 }));
            Equal(Gpt2RtStatus.TokenOutOfRange, e.Status, "prefill past the vocabulary");
            Contains(e.NativeMessage, "token id 50257 at index 1 is outside the vocabulary (0..50257)");
            s.Prefill(new[] { 1, 2 });
            e = Throws<Gpt2RtException>(() => s.Step(-3));
            Equal(Gpt2RtStatus.TokenOutOfRange, e.Status, "negative id");
            Contains(e.NativeMessage, "token id -3 at index 0 is negative");
            e = Throws<Gpt2RtException>(() => s.Step(99999));
            Equal(Gpt2RtStatus.TokenOutOfRange, e.Status, "step past the vocabulary");
            Contains(e.NativeMessage, "99999");
            e = Throws<Gpt2RtException>(() => engine.Tokenizer.Decode(new[] { 70000 }));
            Equal(Gpt2RtStatus.TokenOutOfRange, e.Status, "decode");
            Contains(e.NativeMessage, "70000");
            s.Step(5); // the session is still usable after refused calls
        }
    }

    static void NotPrefilled(Engine engine)
    {
        using (Session s = engine.CreateSession(Profile(1, 32)))
        {
            Equal(0, s.Batch, "no batch yet");
            UIntPtr batch = new UIntPtr(12345);
            Equal(Gpt2RtStatus.Ok, Native.gpt2rt_session_batch(Raw(s), out batch), "session_batch before prefill");
            Equal(0UL, batch.ToUInt64(), "raw batch 0 before prefill");
            Throws<Gpt2RtException>(() => { var n = s.LogitsSize; });
            var e = Throws<Gpt2RtException>(() => s.Step(1));
            Equal(Gpt2RtStatus.NotPrefilled, e.Status, "step");
            Contains(e.Message, "GPT2RT_STATUS_NOT_PREFILLED: ");
            e = Throws<Gpt2RtException>(() => s.ReadLogits());
            Equal(Gpt2RtStatus.NotPrefilled, e.Status, "read_logits");
            Contains(e.NativeMessage, "call prefill first");
            e = Throws<Gpt2RtException>(() => s.Sample());
            Equal(Gpt2RtStatus.NotPrefilled, e.Status, "sample");
        }
    }

    static void ProfileErrors(Engine engine)
    {
        ModelInfo info = engine.Info;
        var e = Throws<Gpt2RtException>(() => engine.CreateSession(Profile(info.MaxBatch + 1, 16)));
        Equal(Gpt2RtStatus.ProfileUnsupported, e.Status, "max_batch beyond the engine");
        Contains(e.NativeMessage, info.MaxBatch.ToString());
        e = Throws<Gpt2RtException>(() => engine.CreateSession(Profile(1, info.MaxSeq + 1)));
        Equal(Gpt2RtStatus.ProfileUnsupported, e.Status, "max_seq beyond the engine");
        Contains(e.NativeMessage, info.MaxSeq.ToString());

        using (Session s = engine.CreateSession(Profile(1, 8)))
        {
            Equal(1, s.MaxBatch, "granted batch");
            Equal(8, s.MaxSeq, "granted seq");
            e = Throws<Gpt2RtException>(() => s.Prefill(new[] { new[] { 1 }, new[] { 2 } }));
            Equal(Gpt2RtStatus.BatchExceedsProfile, e.Status, "2 prompts in a batch-1 profile");
            Contains(e.NativeMessage, "exceeds the session's max_batch 1");
            e = Throws<Gpt2RtException>(() => s.Prefill(Enumerable.Range(1, 20).ToArray()));
            Equal(Gpt2RtStatus.SequenceExceedsProfile, e.Status, "20 tokens in max_seq 8");
            s.Prefill(Enumerable.Range(1, 7).ToArray());
            s.Step(1);
            e = Throws<Gpt2RtException>(() => s.Step(2));
            Equal(Gpt2RtStatus.SequenceExceedsProfile, e.Status, "step past max_seq");
        }
        using (Session s = engine.CreateSession(Profile(2, 16)))
        {
            s.Prefill(new[] { new[] { 1 }, new[] { 2, 3 } });
            e = Throws<Gpt2RtException>(() => s.Step(new[] { 1 }));
            Equal(Gpt2RtStatus.LengthMismatch, e.Status, "1 token for a batch of 2");
        }
    }

    static void InvalidArguments(Engine engine)
    {
        using (Session s = engine.CreateSession(Profile(1, 32)))
        {
            s.Prefill(new[] { 1, 2, 3 });
            var e = Throws<Gpt2RtException>(() => s.Sample(new SamplingOptions { Temperature = 1, TopP = 0 }));
            Equal(Gpt2RtStatus.InvalidArgument, e.Status, "top_p 0");
            Contains(e.NativeMessage, "top_p must be in (0, 1]");
            e = Throws<Gpt2RtException>(() => s.Sample(default(SamplingOptions)));
            Equal(Gpt2RtStatus.InvalidArgument, e.Status, "an all-zero SamplingOptions is invalid (top_p 0)");
            Equal(1, s.Sample(SamplingOptions.Default).Length, "SamplingOptions.Default is valid");
            GenerateOptions o = Options(4);
            o.Sampling.Temperature = -1;
            e = Throws<Gpt2RtException>(() => s.Generate("Hi", o));
            Equal(Gpt2RtStatus.InvalidArgument, e.Status, "negative temperature");
            Throws<ArgumentOutOfRangeException>(() => engine.CreateSession(Profile(-1, 8)));
            Throws<ArgumentOutOfRangeException>(() => s.Generate("Hi", Options(-2)));
        }
    }

    static void StopsAndHandlers(Engine engine)
    {
        var c = s_greedy[0];
        int stop = c.Value[2];
        int firstStop = Array.IndexOf(c.Value, stop);
        using (Session s = engine.CreateSession(Profile(1, 0)))
        {
            GenerateOptions o = Options(s_maxNew);
            o.StopTokens = new[] { stop };
            var got = new List<int>();
            GenerateResult r = s.Generate(c.Key, o, (seq, t, p) => { if (t >= 0) got.Add(t); return true; });
            Equal(FinishReason.StopToken, r.FinishReason, "finish");
            SeqEqual(c.Value.Take(firstStop).ToArray(), got.ToArray(), "tokens before the stop token");
            Equal(firstStop, r.TokenCount, "count excludes the stop token");

            int calls = 0;
            r = s.Generate(c.Key, Options(s_maxNew), (seq, t, p) => ++calls < 3);
            Equal(FinishReason.Callback, r.FinishReason, "handler returned false");
            Equal(3, calls, "calls");
            Equal(3, r.TokenCount, "tokens kept");
            Equal(engine.Tokenizer.Decode(c.Value.Take(3).ToArray()), r.Text, "text kept");

            var e = Throws<InvalidOperationException>(() => s.Generate(c.Key, Options(s_maxNew), (seq, t, p) =>
            {
                throw new InvalidOperationException("boom from the handler");
            }));
            Equal("boom from the handler", e.Message, "the handler's exception comes back");
            True(e.StackTrace.Contains("Tests"), "with its stack trace");

            // Re-entering the session from its own callback is refused, not undefined behaviour.
            Gpt2RtException inner = null;
            s.Generate(c.Key, Options(2), (seq, t, p) =>
            {
                try { s.Step(1); } catch (Gpt2RtException x) { inner = x; }
                return true;
            });
            True(inner != null, "a call from inside the callback fails");
            Equal(Gpt2RtStatus.SessionBusy, inner.Status, "re-entrant call");

            r = s.Generate(c.Key, Options(s_maxNew));
            Equal(engine.Tokenizer.Decode(c.Value), r.Text, "still usable");
        }
    }

    static void CancelFromAnotherThread(Engine engine)
    {
        using (Session s = engine.CreateSession(Profile(1, 0)))
        {
            var firstToken = new ManualResetEvent(false);
            var cancelled = new ManualResetEvent(false);
            Exception cancelError = null;
            var canceller = new Thread(() =>
            {
                try
                {
                    if (!firstToken.WaitOne(s_wait))
                        throw new TimeoutException("no first token");
                    s.Cancel(); // while the generating thread is inside the call
                }
                catch (Exception e) { cancelError = e; }
                finally { cancelled.Set(); }
            });
            canceller.Start();
            int produced = 0;
            var text = new StringBuilder();
            GenerateResult r = s.Generate("Once upon a time", Options(200), (seq, t, p) =>
            {
                produced++;
                text.Append(p);
                if (produced == 2)
                {
                    firstToken.Set();
                    cancelled.WaitOne(s_wait); // deterministic: the cancel lands during generation
                }
                return true;
            });
            canceller.Join();
            if (cancelError != null)
                throw cancelError;
            Equal(FinishReason.Cancelled, r.FinishReason, "finish");
            True(r.TokenCount >= 2 && r.TokenCount <= 3, "ends within one step (" + r.TokenCount + " tokens)");
            Equal(text.ToString(), r.Text, "everything produced is kept");
            // A cancel with no generation running is kept: the next generation ends before its
            // first step, and clears it, so the one after runs normally.
            s.Cancel();
            GenerateResult early = s.Generate("Once upon a time", Options(4));
            Equal(FinishReason.Cancelled, early.FinishReason, "a cancel racing the start is not lost");
            Equal(0, early.TokenCount, "no token after an early cancel");
            GenerateResult normal = s.Generate("Once upon a time", Options(4));
            Equal(FinishReason.Length, normal.FinishReason, "next generation runs");
            Equal(4, normal.TokenCount, "next generation produces its tokens");
            // The same for GenerateTokens; prefill/step/sample in between neither run nor clear it.
            s.Cancel();
            s.Prefill(new[] { 1, 2, 3 });
            s.Step(s.Sample()[0]);
            GenerateTokensResult gt = s.GenerateTokens(new[] { new[] { 1, 2, 3 } }, Options(4));
            Equal(FinishReason.Cancelled, gt.FinishReason, "GenerateTokens after an early cancel");
            Equal(0, gt.Tokens[0].Length, "GenerateTokens: 0 tokens");
            gt = s.GenerateTokens(new[] { new[] { 1, 2, 3 } }, Options(4));
            Equal(FinishReason.Length, gt.FinishReason, "the GenerateTokens after runs");
            Equal(4, gt.Tokens[0].Length, "with its tokens");
        }
    }

    static void SessionBusy(Engine engine)
    {
        using (Session s = engine.CreateSession(Profile(1, 0)))
        {
            var inside = new ManualResetEvent(false);
            var release = new ManualResetEvent(false);
            Exception workerError = null;
            GenerateResult result = default(GenerateResult);
            var worker = new Thread(() =>
            {
                try
                {
                    result = s.Generate("Hello", Options(3), (seq, t, p) =>
                    {
                        inside.Set();
                        release.WaitOne(s_wait);
                        return true;
                    });
                }
                catch (Exception e) { workerError = e; }
            });
            worker.Start();
            True(inside.WaitOne(s_wait), "worker reached its callback");
            try
            {
                var e = Throws<Gpt2RtException>(() => s.Step(1));
                Equal(Gpt2RtStatus.SessionBusy, e.Status, "step from a second thread");
                Contains(e.NativeMessage, "the session is in use by another thread");
                e = Throws<Gpt2RtException>(() => s.Generate("x", Options(1)));
                Equal(Gpt2RtStatus.SessionBusy, e.Status, "generate from a second thread");
                e = Throws<Gpt2RtException>(() => s.GeneratedText());
                Equal(Gpt2RtStatus.SessionBusy, e.Status, "generated_text from a second thread");
            }
            finally
            {
                release.Set();
                worker.Join();
            }
            if (workerError != null)
                throw workerError;
            Equal(3, result.TokenCount, "the first thread's generation finished normally");
            s.Prefill(new[] { 1 }); // free again
        }
    }

    static void DisposeDuringCall(Engine engine)
    {
        Session s = engine.CreateSession(Profile(1, 0));
        var inside = new ManualResetEvent(false);
        var disposed = new ManualResetEvent(false);
        Exception afterwards = null;
        GenerateResult result = default(GenerateResult);
        var worker = new Thread(() =>
        {
            try
            {
                result = s.Generate("Hello", Options(4), (seq, t, p) =>
                {
                    inside.Set();
                    disposed.WaitOne(s_wait);
                    return true;
                });
                s.Step(1);
            }
            catch (Exception e) { afterwards = e; }
        });
        worker.Start();
        True(inside.WaitOne(s_wait), "worker inside Generate");
        s.Dispose(); // returns at once; the native destroy waits for the running call
        disposed.Set();
        worker.Join();
        Equal(4, result.TokenCount, "the running generation completed on a live session");
        True(afterwards is ObjectDisposedException, "the next call sees the disposal: " + afterwards);
    }

    static void LoadErrors()
    {
        var o = TinyOptions();
        o.Backend = Backend.Cuda;
        var e = Throws<Gpt2RtException>(() => Engine.Load(o));
        Equal(Gpt2RtStatus.BackendUnavailable, e.Status, "cuda in this build");
        True(e.NativeMessage.Length > 0, "with a reason");

        o = TinyOptions();
        o.ModelDir = "/nonexistent/gpt2rt-model-ü";
        e = Throws<Gpt2RtException>(() => Engine.Load(o));
        Equal(Gpt2RtStatus.FileNotFound, e.Status, "missing model directory");
        Contains(e.NativeMessage, "/nonexistent/gpt2rt-model-ü"); // the UTF-8 path made it there and back
    }

    static void DisposedHandles()
    {
        Engine engine = LoadTiny();
        Tokenizer tok = engine.Tokenizer;
        Session s = engine.CreateSession(Profile(1, 32));
        engine.Dispose();
        engine.Dispose(); // twice is fine
        // The ABI lets sessions outlive their engine.
        s.Prefill(new[] { 1, 2, 3 });
        s.Step(s.Sample()[0]);

        var e = Throws<ObjectDisposedException>(() => engine.CreateSession());
        Contains(e.Message, "Engine has been disposed");
        Throws<ObjectDisposedException>(() => { var d = engine.Description; });
        e = Throws<ObjectDisposedException>(() => tok.Encode("x"));
        Contains(e.Message, "Tokenizer has been disposed");

        s.Dispose();
        e = Throws<ObjectDisposedException>(() => s.Step(1));
        Contains(e.Message, "Session has been disposed");
        Throws<ObjectDisposedException>(() => s.Cancel());
        Throws<ObjectDisposedException>(() => s.Generate("x"));
        s.Dispose();
    }

    static void LogHandlerWorks()
    {
        var lines = new List<string>();
        Library.SetLogHandler((level, message) => { lock (lines) lines.Add(level + " " + message); });
        try
        {
            var o = new EngineOptions { BuiltinModel = BuiltinModel.Tiny, Backend = Backend.Auto };
            using (Engine e = Engine.Load(o))
                Equal(Backend.Cpu, e.Info.Backend, "auto falls back to the CPU here");
        }
        finally
        {
            Library.SetLogHandler(null);
        }
        lock (lines)
        {
            Console.WriteLine("    {0} log line(s){1}", lines.Count, lines.Count > 0 ? ", first: " + lines[0] : "");
            True(lines.Count > 0, "auto's fallback was logged");
        }
    }

    // ---------------------------------------------------------------- helpers

    static Engine LoadTiny()
    {
        return Engine.Load(TinyOptions());
    }

    static EngineOptions TinyOptions()
    {
        return new EngineOptions { BuiltinModel = BuiltinModel.Tiny, Backend = Backend.Cpu, NumThreads = 2 };
    }

    static SessionOptions Profile(int maxBatch, int maxSeq)
    {
        return new SessionOptions { MaxBatch = maxBatch, MaxSeq = maxSeq };
    }

    static GenerateOptions Options(int maxNew)
    {
        return new GenerateOptions { MaxNewTokens = maxNew };
    }

    // The raw pointer behind a wrapper, for calls the friendly API never makes (the wrapper
    // object stays alive and undisposed around these calls).
    static IntPtr Raw(object wrapper)
    {
        var field = wrapper.GetType().GetField("_handle", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance);
        return ((SafeHandle)field.GetValue(wrapper)).DangerousGetHandle();
    }

    static int Argmax(float[] v, int offset, int n)
    {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (v[offset + i] > v[offset + best])
                best = i;
        return best;
    }

    static void ReadExpected(string path)
    {
        foreach (string line in File.ReadAllLines(path, Encoding.UTF8))
        {
            if (line.Length == 0)
                continue;
            string[] f = line.Split('\t');
            if (f[0] == "max_new_tokens")
            {
                s_maxNew = int.Parse(f[1]);
                continue;
            }
            int[] ids = f[2].Split(new[] { ' ' }, StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray();
            var entry = new KeyValuePair<string, int[]>(f[1], ids);
            if (f[0] == "greedy") s_greedy.Add(entry);
            else if (f[0] == "sampled") s_sampled.Add(entry);
            else if (f[0] == "batch") s_batch.Add(entry);
            else throw new FormatException("unknown kind " + f[0]);
        }
        if (s_greedy.Count == 0)
            throw new FormatException(path + ": no greedy cases");
    }

    static void Run(string name, Action body)
    {
        try
        {
            body();
            s_passed++;
            Console.WriteLine("ok   - " + name);
        }
        catch (Exception e)
        {
            s_failed++;
            Console.WriteLine("FAIL - " + name + ": " + e);
        }
    }

    class AssertionFailed : Exception
    {
        public AssertionFailed(string m) : base(m) { }
    }

    static void True(bool condition, string what)
    {
        if (!condition)
            throw new AssertionFailed("expected true: " + what);
    }

    static void Equal<T>(T expected, T actual, string what)
    {
        if (!EqualityComparer<T>.Default.Equals(expected, actual))
            throw new AssertionFailed(string.Format("{0}: expected <{1}>, got <{2}>", what, expected, actual));
    }

    static void SeqEqual(int[] expected, int[] actual, string what)
    {
        if (!expected.SequenceEqual(actual))
            throw new AssertionFailed(string.Format("{0}:\n      expected {1}\n      got      {2}", what, string.Join(" ", expected), string.Join(" ", actual)));
    }

    static void Contains(string text, string part)
    {
        if (text == null || !text.Contains(part))
            throw new AssertionFailed(string.Format("expected <{0}> to contain <{1}>", text, part));
    }

    static TException Throws<TException>(Action body) where TException : Exception
    {
        try
        {
            body();
        }
        catch (TException e)
        {
            return e;
        }
        catch (Exception e)
        {
            throw new AssertionFailed("expected " + typeof(TException).Name + ", got " + e.GetType().Name + ": " + e.Message);
        }
        throw new AssertionFailed("expected " + typeof(TException).Name + ", nothing was thrown");
    }
}
