// Sample: the polling model. Start() loads the engine and prefills the prompt once; every
// Update() then samples one token and runs one decode step, so the frame loop drives generation:
// no hidden threads, no callbacks. Attach to any GameObject and press Play.
using Gpt2Rt;
using UnityEngine;

public class Gpt2RtStepPerFrame : MonoBehaviour
{
    [Tooltip("Hugging Face GPT-2 directory; empty = the built-in synthetic model (gibberish by construction)")]
    public string modelDirectory = "";
    public BuiltinModel builtinModel = BuiltinModel.DistilGpt2;
    public Backend backend = Backend.Auto;
    public string prompt = "Hello, my name is";
    public int maxNewTokens = 32;

    /// <summary>The text so far (prompt excluded).</summary>
    public string GeneratedText { get; private set; }
    public int TokenCount { get { return _count; } }
    public bool Done { get; private set; }

    Engine _engine;
    Session _session;
    readonly int[] _next = new int[1]; // reused every frame: Sample and Step allocate nothing
    int[] _generated;
    int _count;
    int _firstFrame;

    /// <summary>The tokens generated so far.</summary>
    public int[] GeneratedTokens()
    {
        var copy = new int[_count];
        System.Array.Copy(_generated, copy, _count);
        return copy;
    }

    void Start()
    {
        GeneratedText = "";
        // Loading runs on the main thread here for clarity; the built-in DistilGPT2 is generated
        // at load (about a second). A real game would load during a loading screen.
        _engine = Engine.Load(new EngineOptions { ModelDir = modelDirectory, BuiltinModel = builtinModel, Backend = backend });
        int[] promptIds = _engine.Tokenizer.Encode(prompt);
        _session = _engine.CreateSession(new SessionOptions { MaxBatch = 1, MaxSeq = promptIds.Length + maxNewTokens });
        _generated = new int[maxNewTokens];
        _session.Prefill(promptIds);
        _firstFrame = Time.frameCount;
        Debug.Log("gpt2rt " + Library.Version + ": " + _engine.Description);
    }

    void Update()
    {
        if (Done || _session == null)
            return;
        _session.Sample(_next); // greedy; pass SamplingOptions for temperature / top-k / top-p
        _generated[_count++] = _next[0];
        GeneratedText = _engine.Tokenizer.Decode(_generated, _count);
        if (_count == maxNewTokens)
        {
            Done = true;
            Debug.Log(string.Format("{0} new tokens in {1} frames: {2}{3}", _count, Time.frameCount - _firstFrame + 1, prompt, GeneratedText));
            return;
        }
        _session.Step(_next[0]); // one decode step per frame: the next frame's logits
    }

    void OnDestroy()
    {
        if (_session != null)
            _session.Dispose();
        if (_engine != null)
            _engine.Dispose();
    }
}
