using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>Helpers for the wire's <see cref="Errno"/>.</summary>
public static class ErrnoExtensions
{
    /// <summary>The call succeeded (errno 0).</summary>
    public static bool IsOk(this Errno e) => e == Errno.Unspecified;

    /// <summary>Throws <see cref="UffdErrnoException"/> unless <paramref name="e"/> is success.</summary>
    public static void Expect(this Errno e, string what)
    {
        if (!e.IsOk())
            throw new UffdErrnoException(e, what);
    }

    /// <summary>The kernel's spelling: "ok" for success, else the errno name ("EEXIST"), or "E#n" for a number the enum does not name.</summary>
    public static string Name(this Errno e) =>
        e == Errno.Unspecified ? "ok" : Enum.IsDefined(e) ? e.ToString().ToUpperInvariant() : "E#" + ((int)e).ToString(System.Globalization.CultureInfo.InvariantCulture);
}

/// <summary>A call the caller needed to succeed returned an errno (see <see cref="ErrnoExtensions.Expect"/>).</summary>
public sealed class UffdErrnoException(Errno errno, string what) : Exception($"{what}: {errno.Name()}")
{
    public Errno Errno { get; } = errno;
}
