// The test program (bindings/csharp/tests/) reaches the internal layout check and raw imports to
// exercise error paths the friendly API cannot produce (a bad struct_size, NULL arguments).
using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("Gpt2Rt.Tests")]
