using System.Diagnostics;
using System.Security.Cryptography;

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

    private static readonly SemaphoreSlim s_build = new(1, 1);
    private static string? s_binary;

    /// <summary>Why the real-kernel backend cannot run on this host, or null when it can.</summary>
    public static string? Unavailable()
    {
        if (!OperatingSystem.IsLinux() || System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture != System.Runtime.InteropServices.Architecture.X64)
            return "not Linux x86-64 (kuffd uses x86-64 syscall numbers and layouts)";
        if (!CanUseUserfaultfd(out var why))
            return why;
        if (Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } bin)
            return File.Exists(bin) ? null : $"{BinaryVariable}={bin}: no such file";
        if (typeof(KuffdHarness).Assembly.GetManifestResourceInfo("kuffd.c") is null)
            return $"this build has no kuffd source embedded (built without tests/conformance/harness); set {BinaryVariable} to a kuffd binary";
        return FindOnPath("gcc") is null ? "gcc not found on PATH (needed to build the kuffd harness)" : null;
    }

    /// <summary>
    /// userfaultfd(2) with kernel-mode faults, as the scenarios need: CAP_SYS_PTRACE (root), or
    /// vm.unprivileged_userfaultfd=1 (userfaultfd_syscall_allowed, fs/userfaultfd.c).
    /// /dev/userfaultfd alone is not enough: its uffds handle kernel faults only for
    /// CAP_SYS_PTRACE too, so without it `uffd open` scenarios would diverge.
    /// </summary>
    private static bool CanUseUserfaultfd(out string why)
    {
        why = "";
        const ulong capSysPtrace = 1UL << 19;
        var capEff = ReadTrim("/proc/self/status")?.Split('\n').FirstOrDefault(l => l.StartsWith("CapEff:", StringComparison.Ordinal));
        if (capEff is not null && ulong.TryParse(capEff[7..].Trim(), System.Globalization.NumberStyles.HexNumber, null, out var caps) && (caps & capSysPtrace) != 0)
            return true;
        if (ReadTrim("/proc/sys/vm/unprivileged_userfaultfd") == "1")
            return true;
        why = "no CAP_SYS_PTRACE (not root) and vm.unprivileged_userfaultfd=0: userfaultfd with kernel-mode faults is not available";
        return false;
    }

    /// <summary>A host file's text, trimmed, or null when it cannot be read (the probe reads /proc and /sys with it too).</summary>
    public static string? ReadTrim(string path)
    {
        try
        {
            return File.ReadAllText(path).Trim();
        }
        catch (IOException)
        {
            return null;
        }
        catch (UnauthorizedAccessException)
        {
            return null;
        }
    }

    private static string? FindOnPath(string exe) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, exe)).FirstOrDefault(File.Exists);

    /// <summary>The harness binary: <see cref="BinaryVariable"/>, or the embedded source compiled once (cached by its SHA-256).</summary>
    public static async Task<string> BinaryAsync(CancellationToken ct = default)
    {
        if (Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } bin)
            return bin;
        if (s_binary is { } done)
            return done;
        await s_build.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (s_binary is { } again)
                return again;
            byte[] source;
            var stream = typeof(KuffdHarness).Assembly.GetManifestResourceStream("kuffd.c") ?? throw new InvalidOperationException("kuffd.c is not embedded");
            await using (stream.ConfigureAwait(false))
            {
                using var ms = new MemoryStream();
                await stream.CopyToAsync(ms, ct).ConfigureAwait(false);
                source = ms.ToArray();
            }
            var hash = Convert.ToHexStringLower(SHA256.HashData(source))[..16];
            var dir = Path.Combine(Path.GetTempPath(), "uffdgrpc-kuffd-" + hash);
            var exe = Path.Combine(dir, "kuffd");
            if (!File.Exists(exe))
            {
                Directory.CreateDirectory(dir);
                var src = Path.Combine(dir, $"kuffd.{Environment.ProcessId}.c");
                var tmp = Path.Combine(dir, $"kuffd.{Environment.ProcessId}.tmp");
                await File.WriteAllBytesAsync(src, source, ct).ConfigureAwait(false);
                var (rc, _, err) = await RunProcessAsync("gcc", ["-O2", "-pthread", "-o", tmp, src, "-lpthread"], null, TimeSpan.FromMinutes(2), ct).ConfigureAwait(false);
                File.Delete(src);
                if (rc != 0)
                    throw new InvalidOperationException($"gcc failed building kuffd (exit {rc}): {err.Trim()}");
                File.Move(tmp, exe, overwrite: true);
            }
            s_binary = exe;
            return exe;
        }
        finally
        {
            s_build.Release();
        }
    }

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
