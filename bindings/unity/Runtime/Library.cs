// Process-wide entry points: versions, the startup layout check, the log callback, and the
// helpers every wrapper uses (status checks, UTF-8 by hand, the required-size convention).
using System;
using System.Runtime.InteropServices;
using System.Text;

#if !UNITY_5_3_OR_NEWER
namespace AOT
{
    /// <summary>
    /// Unity's IL2CPP needs static methods called from native code to carry this attribute (Unity
    /// defines it in UnityEngine). Outside Unity it is defined here so the same sources compile.
    /// </summary>
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type delegateType) { DelegateType = delegateType; }
        public Type DelegateType { get; private set; }
    }
}
#endif

namespace Gpt2Rt
{
    /// <summary>Receives the library's log lines: level 1 error, 2 warn, 3 info, 4 debug.</summary>
    public delegate void LogHandler(int level, string message);

    /// <summary>Library-wide functions and the checks the wrappers share.</summary>
    public static class Library
    {
        /// <summary>The ABI these bindings were written against (GPT2RT_ABI_VERSION).</summary>
        public const uint ExpectedAbiVersion = 1;

        static readonly object s_lock = new object();
        static bool s_verified;

        /// <summary>The loaded library's version string, e.g. "0.1.0".</summary>
        public static string Version
        {
            get { return Utf8.FromNulTerminated(Native.gpt2rt_version_string()); }
        }

        /// <summary>The loaded library's ABI version.</summary>
        public static uint AbiVersion
        {
            get { return Native.gpt2rt_abi_version(); }
        }

        /// <summary>The C name of a status, e.g. "GPT2RT_STATUS_SESSION_BUSY".</summary>
        public static string StatusName(Gpt2RtStatus status)
        {
            try
            {
                return Utf8.FromNulTerminated(Native.gpt2rt_status_name((uint)status));
            }
            catch (DllNotFoundException)
            {
                return "GPT2RT_STATUS_" + status;
            }
        }

        /// <summary>
        /// Checks once per process that the loaded library speaks this ABI and that every options
        /// struct mirrored here has the size the library reports in struct_size. Every entry point
        /// (Engine.Load, Tokenizer.CreateGpt2, the options constructors) calls it first.
        /// </summary>
        public static void EnsureCompatible()
        {
            if (s_verified)
                return;
            lock (s_lock)
            {
                if (s_verified)
                    return;
                NativeLibraryResolver.Register();
                uint abi;
                try
                {
                    abi = Native.gpt2rt_abi_version();
                }
                catch (DllNotFoundException e)
                {
                    throw new DllNotFoundException(
                        "gpt2rt: the native library was not found. Put gpt2rt.dll (Windows) or libgpt2rt.so (Linux) "
                        + "beside the application, in runtimes/<rid>/native/ (.NET Core 3+), or in a Unity Plugins folder. ("
                        + e.Message + ")", e);
                }
                if (abi != ExpectedAbiVersion)
                    throw new Gpt2RtException(Gpt2RtStatus.StructSize, string.Format(
                        "the loaded gpt2rt library has ABI version {0}, these C# bindings were written for {1}", abi, ExpectedAbiVersion));

                NativeEngineOptions eo;
                Check(Native.gpt2rt_engine_options_default(out eo));
                CheckLayout("gpt2rt_engine_options", Marshal.SizeOf(typeof(NativeEngineOptions)), eo.struct_size);
                NativeSessionOptions so;
                Check(Native.gpt2rt_session_options_default(out so));
                CheckLayout("gpt2rt_session_options", Marshal.SizeOf(typeof(NativeSessionOptions)), so.struct_size);
                NativeGenerateOptions go;
                Check(Native.gpt2rt_generate_options_default(out go));
                CheckLayout("gpt2rt_generate_options", Marshal.SizeOf(typeof(NativeGenerateOptions)), go.struct_size);
                s_verified = true;
            }
        }

        internal static void CheckLayout(string name, int managedSize, UIntPtr nativeSize)
        {
            if ((ulong)managedSize != nativeSize.ToUInt64())
                throw new Gpt2RtException(Gpt2RtStatus.StructSize, string.Format(
                    "{0}: the C# mirror is {1} bytes but the library's struct_size is {2}; the bindings do not match the loaded library",
                    name, managedSize, nativeSize.ToUInt64()));
        }

        // ---- the log callback: one static delegate, IL2CPP-safe ----
        static readonly NativeLogCallback s_logCallback = OnLog;
        static LogHandler s_logHandler;

        /// <summary>
        /// Installs the process-wide log handler (null removes it). It is called from whichever
        /// thread logs, so it must be thread-safe (in Unity, queue the lines to the main thread).
        /// </summary>
        public static void SetLogHandler(LogHandler handler)
        {
            EnsureCompatible();
            lock (s_lock)
            {
                s_logHandler = handler;
                IntPtr fn = handler == null ? IntPtr.Zero : Marshal.GetFunctionPointerForDelegate(s_logCallback);
                Check(Native.gpt2rt_set_log_callback(fn, IntPtr.Zero));
            }
        }

        [AOT.MonoPInvokeCallback(typeof(NativeLogCallback))]
        static void OnLog(IntPtr userData, int level, IntPtr message, UIntPtr messageLen)
        {
            LogHandler handler = s_logHandler;
            if (handler == null)
                return;
            try
            {
                handler(level, Utf8.FromNative(message, messageLen));
            }
            catch (Exception)
            {
                // An exception must not unwind into native frames; a failing log handler loses a line.
            }
        }

        // ---- shared helpers ----

        /// <summary>Throws Gpt2RtException unless OK; call it right after the native call.</summary>
        internal static void Check(Gpt2RtStatus status)
        {
            if (status != Gpt2RtStatus.Ok)
                throw new Gpt2RtException(status, LastErrorMessage());
        }

        internal static string LastErrorMessage()
        {
            return Utf8.FromNulTerminated(Native.gpt2rt_last_error_message());
        }

        internal static UIntPtr Size(int value, string name)
        {
            if (value < 0)
                throw new ArgumentOutOfRangeException(name, value, name + " must not be negative");
            return new UIntPtr((uint)value);
        }

        internal static int ToInt(UIntPtr value)
        {
            ulong v = value.ToUInt64();
            return v > int.MaxValue ? int.MaxValue : (int)v;
        }

        internal delegate Gpt2RtStatus SizedRead(byte[] buffer, UIntPtr capacity, out UIntPtr length);

        /// <summary>
        /// The required-size convention: try with a guess; BUFFER_TOO_SMALL writes the size needed,
        /// so allocate exactly that and call again.
        /// </summary>
        internal static string ReadUtf8(SizedRead read, int guess)
        {
            byte[] buffer = new byte[Math.Max(guess, 0)];
            for (int attempt = 0; ; attempt++)
            {
                UIntPtr length;
                Gpt2RtStatus status = read(buffer, new UIntPtr((uint)buffer.Length), out length);
                if (status == Gpt2RtStatus.Ok)
                    return Encoding.UTF8.GetString(buffer, 0, ToInt(length));
                int needed = ToInt(length);
                if (status != Gpt2RtStatus.BufferTooSmall || needed <= buffer.Length || attempt >= 2)
                    throw new Gpt2RtException(status, LastErrorMessage());
                buffer = new byte[needed];
            }
        }
    }

    /// <summary>UTF-8 both ways, by hand: the ABI takes bytes + length, never NUL-terminated input.</summary>
    internal static class Utf8
    {
        internal static byte[] Bytes(string text)
        {
            return text == null ? new byte[0] : Encoding.UTF8.GetBytes(text);
        }

        internal static string FromNative(IntPtr bytes, UIntPtr length)
        {
            int n = Library.ToInt(length);
            if (bytes == IntPtr.Zero || n == 0)
                return string.Empty;
            byte[] copy = new byte[n];
            Marshal.Copy(bytes, copy, 0, n);
            return Encoding.UTF8.GetString(copy);
        }

        internal static string FromNulTerminated(IntPtr text)
        {
            if (text == IntPtr.Zero)
                return string.Empty;
            int n = 0;
            while (Marshal.ReadByte(text, n) != 0)
                n++;
            return FromNative(text, new UIntPtr((uint)n));
        }
    }
}
