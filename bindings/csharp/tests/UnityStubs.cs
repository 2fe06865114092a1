// TEST-ONLY. NOT PART OF THE UNITY PACKAGE, NEVER SHIPPED.
// Stand-ins for the few UnityEngine types the package's sample uses, so tools/test_csharp.sh can
// compile bindings/unity/Runtime as Unity would (UNITY_5_3_OR_NEWER, where UnityEngine provides
// AOT.MonoPInvokeCallbackAttribute) and drive the sample's Start/Update without Unity.
using System;

namespace UnityEngine
{
    public class Object { }
    public class Component : Object { }
    public class Behaviour : Component { public bool enabled = true; }
    public class MonoBehaviour : Behaviour { }

    [AttributeUsage(AttributeTargets.Field)]
    public sealed class TooltipAttribute : Attribute
    {
        public TooltipAttribute(string tooltip) { }
    }

    public static class Debug
    {
        public static void Log(object message) { Console.WriteLine("[Debug.Log] " + message); }
    }

    public static class Time
    {
        public static int frameCount;
        public static float deltaTime = 1f / 60f;
    }
}

namespace AOT
{
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type type) { }
    }
}
