using System.Text;

namespace UffdGrpc.Scenarios.Host;

/// <summary>How a scenario came out on the model and on the real kernel.</summary>
public enum DiffOutcome
{
    /// <summary>The same trace, byte for byte.</summary>
    Equal,
    /// <summary>The first kernel run diverged, a second one gave the model's trace: the kernel is not stable on this scenario here.</summary>
    EqualOnRerun,
    /// <summary>The traces differ (the kernel was run twice).</summary>
    Diverged,
    /// <summary>The kernel stopped at a <c>require</c> line this host does not meet (the model configures its machine to meet it).</summary>
    KernelSkipped,
}

/// <summary>The counts of a run of differential results, and its summary line.</summary>
public sealed class DiffTally
{
    public int Equal { get; private set; }
    public int EqualOnRerun { get; private set; }
    public int KernelSkipped { get; private set; }
    public List<DiffResult> Diverged { get; } = [];

    public void Add(DiffResult r)
    {
        switch (r.Outcome)
        {
            case DiffOutcome.Equal:
                Equal++;
                break;
            case DiffOutcome.EqualOnRerun:
                EqualOnRerun++;
                break;
            case DiffOutcome.KernelSkipped:
                KernelSkipped++;
                break;
            default:
                Diverged.Add(r);
                break;
        }
    }

    /// <summary>The line <c>replay --diff</c> ends a folder with.</summary>
    public string Summary => $"summary: equal={Equal + EqualOnRerun} (on a second kernel run: {EqualOnRerun}) diverged={Diverged.Count} skipped-by-kernel={KernelSkipped}";
}

/// <summary>One scenario's differential result; the line and both texts are those of the first divergence.</summary>
public sealed record DiffResult(string Name, DiffOutcome Outcome, int Line, string ModelLine, string KernelLine)
{
    /// <summary>For <see cref="DiffOutcome.Diverged"/>: whether both kernel runs printed the same trace.</summary>
    public bool KernelStable { get; init; }
    /// <summary>For <see cref="DiffOutcome.KernelSkipped"/>: the kernel's SKIP line.</summary>
    public string? SkipLine { get; init; }
}

/// <summary>
/// Runs a scenario on the model and on the real kernel (<see cref="KuffdHarness"/>) and finds
/// the first line where the traces part. A divergence is rerun once on the kernel, so a
/// scenario that is not stable on this host is reported as such rather than as a model bug.
/// </summary>
public static class KernelDiff
{
    /// <summary>Runs <paramref name="script"/> on a fresh model backend from <paramref name="model"/> and on the kernel.</summary>
    public static async Task<DiffResult> RunAsync(string name, string script, Func<IKernelBackend> model, CancellationToken ct = default)
    {
        var modelTrace = await ModelTraceAsync(script, model).ConfigureAwait(false);
        var (kernelTrace, _) = await KuffdHarness.RunAsync(script, ct).ConfigureAwait(false);
        if (FirstSkip(kernelTrace) is { } skip && FirstSkip(modelTrace) != skip)
            return new DiffResult(name, DiffOutcome.KernelSkipped, 0, "", "") { SkipLine = skip };
        if (FirstDivergence(modelTrace, kernelTrace) is not { } first)
            return new DiffResult(name, DiffOutcome.Equal, 0, "", "");
        var (again, _) = await KuffdHarness.RunAsync(script, ct).ConfigureAwait(false);
        if (again == modelTrace)
            return new DiffResult(name, DiffOutcome.EqualOnRerun, first.Line, first.Model, first.Kernel);
        return new DiffResult(name, DiffOutcome.Diverged, first.Line, first.Model, first.Kernel) { KernelStable = again == kernelTrace };
    }

    /// <summary>The model's trace of <paramref name="script"/>.</summary>
    public static async Task<string> ModelTraceAsync(string script, Func<IKernelBackend> model)
    {
        var sw = new StringWriter { NewLine = "\n" };
        var backend = model();
        await using (backend.ConfigureAwait(false))
        {
            using var reader = new StringReader(script);
            await new ScenarioInterpreter(backend, sw).RunAsync(reader).ConfigureAwait(false);
        }
        return sw.ToString();
    }

    private static string? FirstSkip(string trace) =>
        trace.Split('\n').FirstOrDefault(l => l.StartsWith("SKIP ", StringComparison.Ordinal));

    /// <summary>The first differing line (1-based) with both texts, <c>&lt;end of trace&gt;</c> past an end; null when equal.</summary>
    public static (int Line, string Model, string Kernel)? FirstDivergence(string model, string kernel)
    {
        if (model == kernel)
            return null;
        var m = model.Split('\n');
        var k = kernel.Split('\n');
        for (var i = 0; i < Math.Max(m.Length, k.Length); i++)
        {
            var ml = i < m.Length ? m[i] : "<end of trace>";
            var kl = i < k.Length ? k[i] : "<end of trace>";
            if (ml != kl)
                return (i + 1, ml, kl);
        }
        return (Math.Max(m.Length, k.Length), "", "");
    }

    /// <summary>The result as the CLI and the tests print it.</summary>
    public static string Format(DiffResult r)
    {
        var sb = new StringBuilder();
        switch (r.Outcome)
        {
            case DiffOutcome.Equal:
                sb.Append("EQUAL    ").Append(r.Name);
                break;
            case DiffOutcome.KernelSkipped:
                sb.Append("SKIP     ").Append(r.Name).Append(": the kernel printed «").Append(r.SkipLine).Append('»');
                break;
            case DiffOutcome.EqualOnRerun:
                sb.Append("EQUAL    ").Append(r.Name).Append(" (on the kernel's second run; the first diverged at line ").Append(r.Line).Append(')').Append('\n');
                AppendLines(sb, r);
                break;
            default:
                sb.Append("DIVERGE  ").Append(r.Name).Append(" at line ").Append(r.Line)
                    .Append(r.KernelStable ? " (the kernel printed the same trace twice)" : " (the kernel's two runs differed too)").Append('\n');
                AppendLines(sb, r);
                break;
        }
        return sb.ToString().TrimEnd('\n');
    }

    private static void AppendLines(StringBuilder sb, DiffResult r) =>
        sb.Append("  model:  ").Append(r.ModelLine).Append('\n').Append("  kernel: ").Append(r.KernelLine).Append('\n');
}
