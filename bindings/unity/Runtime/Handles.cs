// One SafeHandle per opaque C type; ReleaseHandle calls the matching *_destroy. The reference
// count of SafeHandle (taken by HandleLease around every call) makes Dispose from another thread
// safe: the native object is destroyed only once no call on it is running, as the ABI requires.
using System;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    internal sealed class EngineHandle : SafeHandle
    {
        internal EngineHandle(IntPtr raw) : base(IntPtr.Zero, true) { SetHandle(raw); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            Native.gpt2rt_engine_destroy(handle);
            return true;
        }
    }

    internal sealed class SessionHandle : SafeHandle
    {
        internal SessionHandle(IntPtr raw) : base(IntPtr.Zero, true) { SetHandle(raw); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            Native.gpt2rt_session_destroy(handle);
            return true;
        }
    }

    internal sealed class TokenizerHandle : SafeHandle
    {
        internal TokenizerHandle(IntPtr raw) : base(IntPtr.Zero, true) { SetHandle(raw); }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle()
        {
            Native.gpt2rt_tokenizer_destroy(handle);
            return true;
        }
    }

    /// <summary>
    /// Holds a reference on a handle for the duration of one native call:
    /// <c>using (var h = new HandleLease(handle, "Session")) Native.f(h.Ptr, ...);</c>
    /// A disposed handle throws ObjectDisposedException naming the object.
    /// </summary>
    internal struct HandleLease : IDisposable
    {
        readonly SafeHandle _handle;
        readonly bool _added;
        internal readonly IntPtr Ptr;

        internal HandleLease(SafeHandle handle, string owner)
        {
            _handle = handle;
            _added = false;
            Ptr = IntPtr.Zero;
            if (handle.IsClosed || handle.IsInvalid)
                throw new ObjectDisposedException(owner, owner + " has been disposed");
            try
            {
                handle.DangerousAddRef(ref _added);
            }
            catch (ObjectDisposedException)
            {
                throw new ObjectDisposedException(owner, owner + " has been disposed");
            }
            Ptr = handle.DangerousGetHandle();
        }

        public void Dispose()
        {
            if (_added)
                _handle.DangerousRelease();
        }
    }
}
