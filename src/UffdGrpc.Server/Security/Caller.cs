namespace UffdGrpc.Server.Security;

/// <summary>
/// The principal of the call being served. Set once per call by <see cref="AuthInterceptor"/>
/// (an async-local, like ASP.NET Core's HttpContext accessor, so it flows through the call's
/// awaits) and read by the registry, which shows each principal only what it owns or was
/// granted.
/// </summary>
public static class Caller
{
    private static readonly AsyncLocal<string?> s_principal = new();

    /// <summary>The current call's principal; null outside a call (in-process use sees everything).</summary>
    public static string? Principal
    {
        get => s_principal.Value;
        internal set => s_principal.Value = value;
    }
}
