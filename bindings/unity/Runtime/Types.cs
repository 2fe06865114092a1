// The enums and plain structs of the C ABI, and the exception every failing call throws.
using System;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    /// <summary>The result of every gpt2rt function (gpt2rt_status; numbers are stable).</summary>
    public enum Gpt2RtStatus : uint
    {
        Ok = 0,
        InvalidArgument = 1,
        NullPointer = 2,
        StructSize = 3,
        BufferTooSmall = 4,
        InvalidUtf8 = 5,
        TokenOutOfRange = 6,
        BatchExceedsProfile = 7,
        SequenceExceedsProfile = 8,
        ProfileUnsupported = 9,
        NotPrefilled = 10,
        LengthMismatch = 11,
        SessionBusy = 12,
        Io = 100,
        FileNotFound = 101,
        ModelFormat = 102,
        MissingTensor = 103,
        ShapeMismatch = 104,
        UnsupportedDtype = 105,
        InvalidConfig = 106,
        Tokenizer = 107,
        BackendUnavailable = 200,
        OutOfMemory = 201,
        Device = 202,
        Panic = 900,
        Internal = 901,
    }

    /// <summary>Why a generation ended (gpt2rt_finish_reason).</summary>
    public enum FinishReason : uint
    {
        Length = 0,
        StopToken = 1,
        Cancelled = 2,
        Callback = 3,
    }

    /// <summary>Which backend runs the model (gpt2rt_backend).</summary>
    public enum Backend : uint
    {
        Auto = 0,
        Cpu = 1,
        Cuda = 2,
        TensorRT = 3,
    }

    /// <summary>Compute dtype for device backends (gpt2rt_engine_options.dtype).</summary>
    public enum ComputeDType : uint
    {
        AsStored = 0,
        F32 = 1,
        F16 = 2,
        BF16 = 3,
    }

    /// <summary>The built-in synthetic model used when no model directory is given.</summary>
    public enum BuiltinModel : uint
    {
        DistilGpt2 = 0,
        Gpt2 = 1,
        /// <summary>2 layers, 64 wide, GPT-2 vocabulary: for tests.</summary>
        Tiny = 2,
    }

    /// <summary>
    /// Sampling rules, the exact mirror of gpt2rt_sampling_options (no struct_size in C).
    /// Temperature 0 is greedy. Start from <see cref="Default"/>: <c>default(SamplingOptions)</c>
    /// and <c>new SamplingOptions { ... }</c> leave TopP at 0, which the library refuses
    /// (INVALID_ARGUMENT: top_p must be in (0, 1]).
    /// </summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct SamplingOptions
    {
        public float Temperature;
        public uint TopK;
        public float TopP;
        public ulong Seed;

        /// <summary>
        /// The library's defaults (gpt2rt_sampling_options_default): greedy, i.e. temperature 0,
        /// top_k 0, top_p 1, seed 0. Change fields on the copy:
        /// <c>var s = SamplingOptions.Default; s.Temperature = 0.8f;</c>
        /// </summary>
        public static SamplingOptions Default
        {
            get
            {
                Library.EnsureCompatible();
                SamplingOptions options;
                Library.Check(Native.gpt2rt_sampling_options_default(out options));
                return options;
            }
        }

        /// <summary>Greedy decoding: the same as <see cref="Default"/>.</summary>
        public static SamplingOptions Greedy
        {
            get { return Default; }
        }
    }

    /// <summary>Model dimensions and engine limits (gpt2rt_model_info).</summary>
    public struct ModelInfo
    {
        public int NLayer;
        public int NEmbd;
        public int NHead;
        public int NPositions;
        public int VocabSize;
        /// <summary>Largest MaxBatch a session of this engine may ask for.</summary>
        public int MaxBatch;
        /// <summary>Largest MaxSeq a session of this engine may ask for.</summary>
        public int MaxSeq;
        /// <summary>The backend that runs the model (never Auto).</summary>
        public Backend Backend;
    }

    /// <summary>
    /// A failed gpt2rt call: the status and the library's message for it (read from
    /// gpt2rt_last_error_message right after the call, on the same thread).
    /// </summary>
    public class Gpt2RtException : Exception
    {
        public Gpt2RtStatus Status { get; private set; }
        /// <summary>The library's own message, without the status name.</summary>
        public string NativeMessage { get; private set; }

        public Gpt2RtException(Gpt2RtStatus status, string nativeMessage)
            : base(Library.StatusName(status) + ": " + nativeMessage)
        {
            Status = status;
            NativeMessage = nativeMessage;
        }
    }
}
