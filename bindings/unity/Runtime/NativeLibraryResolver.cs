// Finds the native library in the NuGet-style runtimes/<rid>/native/ layout on .NET Core 3+.
// NativeLibrary does not exist on Mono, .NET Framework or Unity, and these sources must compile
// there too (netstandard-style, C# 7), so it is reached by reflection: where the type is missing
// this does nothing and the runtime's own search applies (Mono: DllImport name + dllmap; Unity:
// the Plugins folder).
using System;
using System.IO;
using System.Reflection;
using System.Runtime.InteropServices;

namespace Gpt2Rt
{
    internal static class NativeLibraryResolver
    {
        static readonly object s_lock = new object();
        static bool s_registered;
        static MethodInfo s_tryLoad;

        /// <summary>True when a .NET Core 3+ resolver was installed for this assembly.</summary>
        internal static bool Installed { get; private set; }

        internal static void Register()
        {
            lock (s_lock)
            {
                if (s_registered)
                    return;
                s_registered = true;
                try
                {
                    Type nativeLibrary = Type.GetType("System.Runtime.InteropServices.NativeLibrary");
                    Type resolverType = Type.GetType("System.Runtime.InteropServices.DllImportResolver");
                    if (nativeLibrary == null || resolverType == null)
                        return;
                    MethodInfo set = nativeLibrary.GetMethod("SetDllImportResolver", new[] { typeof(Assembly), resolverType });
                    s_tryLoad = nativeLibrary.GetMethod("TryLoad", new[] { typeof(string), typeof(IntPtr).MakeByRefType() });
                    MethodInfo resolve = typeof(NativeLibraryResolver).GetMethod("Resolve", BindingFlags.NonPublic | BindingFlags.Static);
                    if (set == null || s_tryLoad == null || resolve == null)
                        return;
                    set.Invoke(null, new object[] { typeof(NativeLibraryResolver).Assembly, Delegate.CreateDelegate(resolverType, resolve) });
                    Installed = true;
                }
                catch (Exception)
                {
                    // Another resolver already owns this assembly (SetDllImportResolver allows one):
                    // the host chose its own resolution, keep it.
                }
            }
        }

        // Signature of System.Runtime.InteropServices.DllImportResolver.
        static IntPtr Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath)
        {
            if (libraryName != Native.Library)
                return IntPtr.Zero;
            foreach (string path in Candidates(assembly))
            {
                if (!File.Exists(path))
                    continue;
                object[] args = { path, IntPtr.Zero };
                if ((bool)s_tryLoad.Invoke(null, args))
                    return (IntPtr)args[1];
            }
            return IntPtr.Zero;
        }

        static System.Collections.Generic.IEnumerable<string> Candidates(Assembly assembly)
        {
            bool windows = Path.DirectorySeparatorChar == '\\';
            bool mac = !windows && Directory.Exists("/System/Library/Frameworks");
            string file = windows ? "gpt2rt.dll" : mac ? "libgpt2rt.dylib" : "libgpt2rt.so";
            string[] rids = windows ? new[] { "win-x64", "win-arm64" }
                : mac ? new[] { "osx-arm64", "osx-x64" }
                : new[] { "linux-x64", "linux-arm64" };
            string assemblyDir = string.IsNullOrEmpty(assembly.Location) ? null : Path.GetDirectoryName(assembly.Location);
            foreach (string dir in new[] { AppDomain.CurrentDomain.BaseDirectory, assemblyDir })
            {
                if (string.IsNullOrEmpty(dir))
                    continue;
                yield return Path.Combine(dir, file);
                foreach (string rid in rids)
                    yield return Path.Combine(Path.Combine(Path.Combine(Path.Combine(dir, "runtimes"), rid), "native"), file);
            }
        }
    }
}
