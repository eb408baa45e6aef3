namespace UffdGrpc.Server.Security;

/// <summary>Who may call the server without a token.</summary>
public enum AnonymousAccess
{
    /// <summary>Callers without a token are accepted from loopback addresses only (the default).</summary>
    Loopback,
    /// <summary>Callers without a token are accepted from anywhere (the container sets this and logs a warning).</summary>
    Allow,
    /// <summary>Every call needs a bearer token.</summary>
    Deny,
}

/// <summary>
/// The <c>Auth</c> configuration section: bearer tokens (<c>Auth:Tokens:PRINCIPAL = TOKEN</c>,
/// e.g. the environment variable <c>Auth__Tokens__alice=…</c>) and anonymous access.
/// </summary>
public sealed class AuthOptions
{
    public const string Section = "Auth";

    /// <summary>The principal of a caller without a token, where anonymous access is allowed.</summary>
    public const string AnonymousPrincipal = "anonymous";

    public AnonymousAccess Anonymous { get; set; } = AnonymousAccess.Loopback;

    /// <summary>Principal name → its bearer token.</summary>
    public Dictionary<string, string> Tokens { get; set; } = [];
}
