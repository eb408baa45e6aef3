using System.Diagnostics;
using UffdGrpc.Shared;

namespace UffdGrpc.Scenarios.Host;

/// <summary>
/// The real-kernel backend of the scenario language: kuffd, the harness that recorded every
/// golden trace (tests/conformance/harness/kuffd.c, embedded in this assembly). kuffd reads
/// the same scripts and prints the same trace format, so running it is the most faithful
/// kernel side a differential test can have: every command is the real syscall or ioctl
/// (mmap, mprotect, madvise, fork, userfaultfd, UFFDIO_*, /proc/PID/pagemap,
/// /proc/kpageflags, PAGEMAP_SCAN, process_vm_readv/writev) in real processes and threads,
/// and the handler reads the real <c>uffd_msg</c>s. The source is compiled once with gcc into
/// a cache folder keyed by its hash. Each run is a child process (kuffd forks its own child
/// and kills it at the end; its 60 s watchdog and ours bound a run).
/// </summary>
public static class KuffdHarness
{
    /// <summary>The environment variable naming a prebuilt kuffd binary to use instead of compiling the embedded source.</summary>
    public const string BinaryVariable = "UFFDGRPC_KUFFD";

    private static readonly EmbeddedCProgram s_program = new(typeof(KuffdHarness).Assembly, "kuffd.c", "kuffd", "-lpthread");

    /// <summary>Why the real-kernel backend cannot run on this host, or null when it can.</summary>
    public static string? Unavailable()
    {
        if (!OperatingSystem.IsLinux() || System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture != System.Runtime.InteropServices.Architecture.X64)
            return "not Linux x86-64 (kuffd uses x86-64 syscall numbers and layouts)";
        if (HostUserfaultfd.WhyNotAllowed() is { } why)
            return why;
        if (Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } bin)
            return File.Exists(bin) ? null : $"{BinaryVariable}={bin}: no such file";
        if (!s_program.Embedded)
            return $"this build has no kuffd source embedded (built without tests/conformance/harness); set {BinaryVariable} to a kuffd binary";
        return HostUserfaultfd.FindOnPath("gcc") is null ? "gcc not found on PATH (needed to build the kuffd harness)" : null;
    }

    /// <summary>A host file's text, trimmed, or null when it cannot be read (the probe reads /proc and /sys with it too).</summary>
    public static string? ReadTrim(string path) => HostUserfaultfd.ReadTrim(path);

    /// <summary>The harness binary: <see cref="BinaryVariable"/>, or the embedded source compiled once (cached by its SHA-256).</summary>
    public static async Task<string> BinaryAsync(CancellationToken ct = default) =>
        Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } bin ? bin : await s_program.BinaryAsync(ct).ConfigureAwait(false);

    /// <summary>Runs <paramref name="script"/> on the real kernel: kuffd's trace and exit status.</summary>
    public static async Task<(string Trace, int ExitCode)> RunAsync(string script, CancellationToken ct = default)
    {
        var exe = await BinaryAsync(ct).ConfigureAwait(false);
        var (rc, stdout, stderr) = await RunProcessAsync(exe, ["-"], script, TimeSpan.FromSeconds(90), ct).ConfigureAwait(false);
        return (stderr.Length == 0 ? stdout : stdout + stderr, rc);
    }

    private static async Task<(int ExitCode, string Stdout, string Stderr)> RunProcessAsync(string file, string[] args, string? stdin, TimeSpan timeout, CancellationToken ct)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + file);
        var outTask = p.StandardOutput.ReadToEndAsync(ct);
        var errTask = p.StandardError.ReadToEndAsync(ct);
        if (stdin is not null)
            await p.StandardInput.WriteAsync(stdin.AsMemory(), ct).ConfigureAwait(false);
        p.StandardInput.Close();
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        try
        {
            await p.WaitForExitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            // kuffd's own child sees its command pipe close and exits.
            p.Kill(entireProcessTree: true);
            await p.WaitForExitAsync(CancellationToken.None).ConfigureAwait(false);
            if (ct.IsCancellationRequested)
                throw;
            return (-1, await outTask.ConfigureAwait(false) + $"TIMEOUT {file} did not finish in {timeout.TotalSeconds:0} s\n", await errTask.ConfigureAwait(false));
        }
        return (p.ExitCode, await outTask.ConfigureAwait(false), await errTask.ConfigureAwait(false));
    }
}
