using UffdGrpc.Mm;
using UffdGrpc.Scenarios;
using UffdGrpc.Scenarios.Host;

namespace UffdGrpc.Cli;

/// <summary>
/// <c>replay --diff FILE|FOLDER</c>: each scenario on the in-process model and on the real
/// kernel (kuffd), the first divergence printed (line, model line, kernel line). Exit status 1
/// when any scenario diverges, 2 when the host cannot run the kernel side, else 0.
/// </summary>
internal static class ReplayDiff
{
    public static async Task<int> RunAsync(TextWriter output, string path, Func<Kernel> model, CancellationToken ct)
    {
        if (KuffdHarness.Unavailable() is { } why)
        {
            await Console.Error.WriteLineAsync($"replay --diff: the kernel backend cannot run here: {why}").ConfigureAwait(false);
            return 2;
        }
        string[] files;
        if (Directory.Exists(path))
            files = [.. Directory.GetFiles(path, "*.scn").Order(StringComparer.Ordinal)];
        else if (File.Exists(path))
            files = [path];
        else
        {
            await Console.Error.WriteLineAsync($"replay --diff: {path}: no such file or folder").ConfigureAwait(false);
            return 1;
        }
        var tally = new DiffTally();
        foreach (var f in files)
        {
            var result = await KernelDiff.RunAsync(Path.GetFileNameWithoutExtension(f), await File.ReadAllTextAsync(f, ct).ConfigureAwait(false), () => new InProcessBackend(model()), ct).ConfigureAwait(false);
            await output.WriteLineAsync(KernelDiff.Format(result)).ConfigureAwait(false);
            await output.FlushAsync(ct).ConfigureAwait(false);
            tally.Add(result);
        }
        if (files.Length > 1)
            await output.WriteLineAsync(tally.Summary).ConfigureAwait(false);
        return tally.Diverged.Count > 0 ? 1 : 0;
    }
}
