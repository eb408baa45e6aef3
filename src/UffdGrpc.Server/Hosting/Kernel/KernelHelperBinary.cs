using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace UffdGrpc.Server.Hosting.Kernel;

/// <summary>
/// The helper program of the kernel backend (uffd-helper.c, embedded in this assembly):
/// compiled once with gcc into a cache folder keyed by the source's hash, as the kuffd
/// harness is, or a prebuilt binary named by <see cref="BinaryVariable"/> or by
/// KernelBackend:HelperPath.
/// </summary>
internal static class KernelHelperBinary
{
    /// <summary>The environment variable naming a prebuilt helper binary.</summary>
    public const string BinaryVariable = "UFFDGRPC_KERNEL_HELPER";

    private const string Resource = "uffd-helper.c";
    private static readonly SemaphoreSlim s_build = new(1, 1);
    private static string? s_binary;

    private static string? Prebuilt(string? configured) =>
        configured is { Length: > 0 } ? configured : Environment.GetEnvironmentVariable(BinaryVariable) is { Length: > 0 } env ? env : null;

    /// <summary>Why this host cannot run kernel-backed address spaces, or null when it can.</summary>
    public static string? Unavailable(string? configured)
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64)
            return "the host is not Linux x86-64";
        if (!UserfaultfdAllowed())
            return "userfaultfd with kernel-mode faults is not available to the server (no CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0)";
        if (Prebuilt(configured) is { } bin)
            return File.Exists(bin) ? null : $"the helper binary {bin} does not exist";
        if (typeof(KernelHelperBinary).Assembly.GetManifestResourceInfo(Resource) is null)
            return $"this build has no {Resource} embedded; set KernelBackend:HelperPath or {BinaryVariable} to a helper binary";
        var gcc = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).Select(d => Path.Combine(d, "gcc")).FirstOrDefault(File.Exists);
        return gcc is null ? "gcc not found on PATH (needed once to build the helper; or set KernelBackend:HelperPath)" : null;
    }

    /// <summary>userfaultfd_syscall_allowed (fs/userfaultfd.c): CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1.</summary>
    private static bool UserfaultfdAllowed()
    {
        const ulong capSysPtrace = 1UL << 19;
        try
        {
            var capEff = File.ReadAllLines("/proc/self/status").FirstOrDefault(l => l.StartsWith("CapEff:", StringComparison.Ordinal));
            if (capEff is not null && ulong.TryParse(capEff[7..].Trim(), System.Globalization.NumberStyles.HexNumber, null, out var caps) && (caps & capSysPtrace) != 0)
                return true;
            return File.ReadAllText("/proc/sys/vm/unprivileged_userfaultfd").Trim() == "1";
        }
        catch (IOException)
        {
            return false;
        }
    }

    /// <summary>The helper binary: a prebuilt one, or the embedded source compiled once.</summary>
    public static async Task<string> PathAsync(string? configured, CancellationToken ct)
    {
        if (Prebuilt(configured) is { } bin)
            return bin;
        if (s_binary is { } done)
            return done;
        await s_build.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (s_binary is { } again)
                return again;
            using var ms = new MemoryStream();
            var stream = typeof(KernelHelperBinary).Assembly.GetManifestResourceStream(Resource) ?? throw new InvalidOperationException(Resource + " is not embedded");
            await using (stream.ConfigureAwait(false))
                await stream.CopyToAsync(ms, ct).ConfigureAwait(false);
            var source = ms.ToArray();
            var dir = Path.Combine(Path.GetTempPath(), "uffdgrpc-helper-" + Convert.ToHexStringLower(SHA256.HashData(source))[..16]);
            var exe = Path.Combine(dir, "uffd-helper");
            if (!File.Exists(exe))
            {
                Directory.CreateDirectory(dir);
                var src = Path.Combine(dir, $"uffd-helper.{Environment.ProcessId}.c");
                var tmp = Path.Combine(dir, $"uffd-helper.{Environment.ProcessId}.tmp");
                await File.WriteAllBytesAsync(src, source, ct).ConfigureAwait(false);
                var psi = new ProcessStartInfo("gcc") { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
                foreach (var a in new[] { "-O2", "-pthread", "-o", tmp, src })
                    psi.ArgumentList.Add(a);
                using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start gcc");
                var err = p.StandardError.ReadToEndAsync(ct);
                _ = await p.StandardOutput.ReadToEndAsync(ct).ConfigureAwait(false);
                await p.WaitForExitAsync(ct).ConfigureAwait(false);
                File.Delete(src);
                if (p.ExitCode != 0)
                    throw new InvalidOperationException($"gcc failed building the kernel helper (exit {p.ExitCode}): {(await err.ConfigureAwait(false)).Trim()}");
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
}
