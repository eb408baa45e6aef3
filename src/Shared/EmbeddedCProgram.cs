using System.Diagnostics;
using System.Reflection;
using System.Security.Cryptography;

namespace UffdGrpc.Shared;

/// <summary>
/// A C program embedded in an assembly as a resource (the kuffd harness, the kernel
/// backend's helper), compiled once with gcc into a cache folder keyed by the source's hash
/// (<c>$TMPDIR/uffdgrpc-NAME-HASH/NAME</c>). Concurrent builds in one process wait for each
/// other; builds in several processes each compile to a file of their own and rename it
/// into place, so none sees a half-written binary.
/// </summary>
internal sealed class EmbeddedCProgram(Assembly assembly, string resource, string name, params string[] libraries) : IDisposable
{
    private readonly SemaphoreSlim _build = new(1, 1);
    private string? _binary;

    /// <summary>Whether this build carries the source.</summary>
    public bool Embedded => assembly.GetManifestResourceInfo(resource) is not null;

    /// <summary>The compiled program's path, compiling it the first time.</summary>
    public async Task<string> BinaryAsync(CancellationToken ct)
    {
        if (_binary is { } done)
            return done;
        await _build.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (_binary is { } again)
                return again;
            byte[] source;
            var stream = assembly.GetManifestResourceStream(resource) ?? throw new InvalidOperationException(resource + " is not embedded");
            await using (stream.ConfigureAwait(false))
            {
                using var ms = new MemoryStream();
                await stream.CopyToAsync(ms, ct).ConfigureAwait(false);
                source = ms.ToArray();
            }
            var dir = Path.Combine(Path.GetTempPath(), $"uffdgrpc-{name}-" + Convert.ToHexStringLower(SHA256.HashData(source))[..16]);
            var exe = Path.Combine(dir, name);
            if (!File.Exists(exe))
            {
                Directory.CreateDirectory(dir);
                var src = Path.Combine(dir, $"{name}.{Environment.ProcessId}.c");
                var tmp = Path.Combine(dir, $"{name}.{Environment.ProcessId}.tmp");
                await File.WriteAllBytesAsync(src, source, ct).ConfigureAwait(false);
                var psi = new ProcessStartInfo("gcc") { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
                foreach (var a in new[] { "-O2", "-pthread", "-o", tmp, src }.Concat(libraries))
                    psi.ArgumentList.Add(a);
                using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start gcc");
                var err = p.StandardError.ReadToEndAsync(ct);
                _ = await p.StandardOutput.ReadToEndAsync(ct).ConfigureAwait(false);
                await p.WaitForExitAsync(ct).ConfigureAwait(false);
                File.Delete(src);
                if (p.ExitCode != 0)
                    throw new InvalidOperationException($"gcc failed building {name} (exit {p.ExitCode}): {(await err.ConfigureAwait(false)).Trim()}");
                File.Move(tmp, exe, overwrite: true);
            }
            _binary = exe;
            return exe;
        }
        finally
        {
            _build.Release();
        }
    }

    public void Dispose() => _build.Dispose();
}
