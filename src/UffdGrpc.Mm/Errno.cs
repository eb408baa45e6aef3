namespace UffdGrpc.Mm;

/// <summary>
/// Linux errno values with the kernel's spelling and x86-64 numbers. Expected failures of
/// the simulated kernel are returned as <see cref="Errno"/>, never thrown.
/// </summary>
public enum Errno
{
    OK = 0,
    EPERM = 1,
    ENOENT = 2,
    ESRCH = 3,
    EINTR = 4,
    EIO = 5,
    ENXIO = 6,
    E2BIG = 7,
    EBADF = 9,
    EAGAIN = 11,
    ENOMEM = 12,
    EACCES = 13,
    EFAULT = 14,
    EBUSY = 16,
    EEXIST = 17,
    ENODEV = 19,
    EINVAL = 22,
    ENOSPC = 28,
    ESPIPE = 29,
    ERANGE = 34,
    ENOSYS = 38,
    ENOTTY = 25,
    EOPNOTSUPP = 95,
    EHWPOISON = 133,
}

/// <summary>Helpers for <see cref="Errno"/>.</summary>
public static class ErrnoExtensions
{
    /// <summary>The name the trace prints: "ok" for success, else the errno name.</summary>
    public static string Name(this Errno e) =>
        e == Errno.OK ? "ok" : Enum.IsDefined(e) ? e.ToString() : "E#" + ((int)e).ToString(System.Globalization.CultureInfo.InvariantCulture);
}
