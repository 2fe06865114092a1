// TEST-ONLY: drives the Unity package's sample (Samples~/StepPerFrame) outside Unity, against the
// stub UnityEngine, as Unity would: Start once, then Update once per frame until done.
// Usage: mono Gpt2Rt.SampleRunner.exe EXPECTED.tsv (the first "greedy" line is the reference).
using System;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Text;
using Gpt2Rt;

static class SampleRunner
{
    static int Main(string[] args)
    {
        string[] reference = File.ReadAllLines(args[0], Encoding.UTF8).Select(l => l.Split('\t')).First(f => f[0] == "greedy");
        int[] expected = reference[2].Split(new[] { ' ' }, StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray();
        int passed = 0, failed = 0;
        Action<bool, string> check = (ok, what) =>
        {
            if (ok) passed++; else failed++;
            Console.WriteLine((ok ? "ok   - " : "FAIL - ") + what);
        };

        var sample = new Gpt2RtStepPerFrame
        {
            builtinModel = BuiltinModel.Tiny,
            backend = Backend.Cpu,
            prompt = reference[1],
            maxNewTokens = expected.Length,
        };
        // Unity calls Start in the frame of the first Update.
        UnityEngine.Time.frameCount = 1;
        Call(sample, "Start");
        int frames = 0;
        while (!sample.Done && frames < 10 * expected.Length)
        {
            Call(sample, "Update");
            frames++;
            UnityEngine.Time.frameCount++;
        }
        int[] got = sample.GeneratedTokens();
        check(got.SequenceEqual(expected), "sample's tokens equal the Rust CLI's: " + string.Join(" ", got));
        check(frames == expected.Length, "one token per frame (" + frames + " frames)");
        check(sample.GeneratedText.Length > 0, "text decoded as it grows");
        Call(sample, "OnDestroy");
        Console.WriteLine("{0} passed, {1} failed", passed, failed);
        return failed == 0 ? 0 : 1;
    }

    // Unity calls these private messages by name; so does this runner.
    static void Call(object target, string method)
    {
        target.GetType().GetMethod(method, BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public).Invoke(target, null);
    }
}
