using System.Globalization;
using System.Text;
using UffdGrpc.Mm;

namespace UffdGrpc.Scenarios;

/// <summary>Number parsing and formatting that matches kuffd.c (strtoul with base 0, printf).</summary>
public static class ScenarioParsing
{
    /// <summary>C's strtoull(s, &amp;end, 0): returns the value and the count of characters consumed (0: none).</summary>
    public static ulong StrToULL(string s, out int used)
    {
        used = 0;
        var i = 0;
        while (i < s.Length && char.IsWhiteSpace(s[i]))
            i++;
        var neg = false;
        if (i < s.Length && (s[i] == '+' || s[i] == '-'))
        {
            neg = s[i] == '-';
            i++;
        }
        var radix = 10;
        var start = i;
        if (i + 1 < s.Length && s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X') && i + 2 < s.Length && Uri.IsHexDigit(s[i + 2]))
        {
            radix = 16;
            i += 2;
        }
        else if (i < s.Length && s[i] == '0')
        {
            radix = 8;
        }
        ulong v = 0;
        var digits = 0;
        for (; i < s.Length; i++)
        {
            var d = DigitValue(s[i]);
            if (d < 0 || d >= radix)
                break;
            v = unchecked((v * (ulong)radix) + (ulong)d);
            digits++;
        }
        if (digits == 0)
        {
            if (radix == 16)
            {
                used = start + 1;
                return 0;
            }
            return 0;
        }
        used = i;
        return neg ? unchecked(0 - v) : v;
    }

    private static int DigitValue(char c) => c switch
    {
        >= '0' and <= '9' => c - '0',
        >= 'a' and <= 'z' => c - 'a' + 10,
        >= 'A' and <= 'Z' => c - 'A' + 10,
        _ => -1,
    };

    /// <summary>strtoull(s, NULL, 0) ignoring trailing garbage.</summary>
    public static ulong Num(string s) => StrToULL(s, out _);

    /// <summary>atoi.</summary>
    public static int Atoi(string s)
    {
        var i = 0;
        while (i < s.Length && char.IsWhiteSpace(s[i]))
            i++;
        var neg = false;
        if (i < s.Length && (s[i] == '+' || s[i] == '-'))
        {
            neg = s[i] == '-';
            i++;
        }
        long v = 0;
        for (; i < s.Length && char.IsAsciiDigit(s[i]); i++)
            v = (v * 10) + (s[i] - '0');
        return (int)(neg ? -v : v);
    }

    /// <summary>parse_pages: "N" or "N+B" (pages plus bytes), both base 0.</summary>
    public static bool ParsePages(string s, out ulong bytes)
    {
        bytes = 0;
        var p = StrToULL(s, out var used);
        if (used == 0)
            return false;
        ulong b = 0;
        if (used < s.Length && s[used] == '+')
        {
            var rest = s[(used + 1)..];
            b = StrToULL(rest, out var u2);
            if (u2 == 0 || u2 != rest.Length)
                return false;
        }
        else if (used < s.Length)
        {
            return false;
        }
        bytes = unchecked((p * Kernel.PageSize) + b);
        return true;
    }

    /// <summary>parse_byte: strtoul base 0, the whole word, at most 255.</summary>
    public static bool ParseByte(string s, out byte b)
    {
        b = 0;
        var v = StrToULL(s, out var used);
        if (used == 0 || used != s.Length || v > 255)
            return false;
        b = (byte)v;
        return true;
    }

    /// <summary>parse_prot: none/-, or any of r w x -.</summary>
    public static bool ParseProt(string s, out Prot prot)
    {
        prot = Prot.None;
        if (s is "none" or "-")
            return true;
        foreach (var c in s)
        {
            switch (c)
            {
                case 'r': prot |= Prot.Read; break;
                case 'w': prot |= Prot.Write; break;
                case 'x': prot |= Prot.Exec; break;
                case '-': break;
                default: return false;
            }
        }
        return true;
    }

    /// <summary>printf("%#llx"): "0" for zero, else "0x…".</summary>
    public static string AltHex(ulong v) => v == 0 ? "0" : "0x" + v.ToString("x", CultureInfo.InvariantCulture);

    /// <summary>The ioctl bit names of kuffd's fmt_ioctls.</summary>
    public static string FormatIoctls(ulong v)
    {
        var names = new Dictionary<int, string>
        {
            [0] = "REGISTER",
            [1] = "UNREGISTER",
            [2] = "WAKE",
            [3] = "COPY",
            [4] = "ZEROPAGE",
            [5] = "MOVE",
            [6] = "WRITEPROTECT",
            [7] = "CONTINUE",
            [8] = "POISON",
            [63] = "API",
        };
        var sb = new StringBuilder();
        for (var i = 0; i < 64; i++)
        {
            if ((v & (1UL << i)) == 0)
                continue;
            if (sb.Length > 0)
                sb.Append('|');
            sb.Append(names.TryGetValue(i, out var n) ? n : "bit" + i.ToString(CultureInfo.InvariantCulture));
        }
        return sb.Length == 0 ? "0" : sb.ToString();
    }

    public static readonly string[] CategoryNames =
        ["wpallowed", "written", "file", "present", "swapped", "pfnzero", "huge", "soft-dirty", "guard"];

    public static string FormatCategories(ulong v)
    {
        var sb = new StringBuilder();
        for (var i = 0; i < 64; i++)
        {
            if ((v & (1UL << i)) == 0)
                continue;
            if (sb.Length > 0)
                sb.Append('|');
            sb.Append(i < 9 ? CategoryNames[i] : "bit" + i.ToString(CultureInfo.InvariantCulture));
        }
        return sb.Length == 0 ? "-" : sb.ToString();
    }

    /// <summary>parse_cats: 0, -, all, or words/bitN/numbers joined by | or ,.</summary>
    public static bool ParseCategories(string s, out ulong v)
    {
        v = 0;
        if (s is "0" or "-")
            return true;
        if (s == "all")
        {
            v = 0x1ff;
            return true;
        }
        foreach (var t in s.Split(['|', ','], StringSplitOptions.RemoveEmptyEntries))
        {
            var idx = Array.IndexOf(CategoryNames, t);
            if (idx >= 0)
            {
                v |= 1UL << idx;
                continue;
            }
            if (t.StartsWith("bit", StringComparison.Ordinal))
            {
                v |= 1UL << (Atoi(t[3..]) & 63);
                continue;
            }
            var x = StrToULL(t, out var used);
            if (used != t.Length)
                return false;
            v |= x;
        }
        return true;
    }

    /// <summary>Feature words of kuffd's feat_names.</summary>
    public static readonly IReadOnlyDictionary<string, ulong> FeatureNames = new Dictionary<string, ulong>
    {
        ["wp"] = 1UL << 0,
        ["pagefault_flag_wp"] = 1UL << 0,
        ["fork"] = 1UL << 1,
        ["event_fork"] = 1UL << 1,
        ["remap"] = 1UL << 2,
        ["event_remap"] = 1UL << 2,
        ["remove"] = 1UL << 3,
        ["event_remove"] = 1UL << 3,
        ["missing_hugetlbfs"] = 1UL << 4,
        ["missing_shmem"] = 1UL << 5,
        ["unmap"] = 1UL << 6,
        ["event_unmap"] = 1UL << 6,
        ["sigbus"] = 1UL << 7,
        ["thread_id"] = 1UL << 8,
        ["minor_hugetlbfs"] = 1UL << 9,
        ["minor_shmem"] = 1UL << 10,
        ["exact_address"] = 1UL << 11,
        ["wp_hugetlbfs_shmem"] = 1UL << 12,
        ["wp_unpopulated"] = 1UL << 13,
        ["poison"] = 1UL << 14,
        ["wp_async"] = 1UL << 15,
        ["move"] = 1UL << 16,
    };

    /// <summary>sigdesc of kuffd.</summary>
    public static string SignalText(SigCode s) => s switch
    {
        SigCode.SegvMaperr => "SIGSEGV SEGV_MAPERR",
        SigCode.SegvAccerr => "SIGSEGV SEGV_ACCERR",
        SigCode.BusAdrerr => "SIGBUS BUS_ADRERR",
        SigCode.BusMceerrAr => "SIGBUS BUS_MCEERR_AR",
        _ => "SIG?",
    };

    /// <summary>fmt_vals: one byte per page, runs of two or more as *N.</summary>
    public static string FormatValues(ReadOnlySpan<byte> v)
    {
        var sb = new StringBuilder();
        var i = 0;
        while (i < v.Length)
        {
            var j = i + 1;
            while (j < v.Length && v[j] == v[i])
                j++;
            if (sb.Length > 0)
                sb.Append(' ');
            sb.Append("0x").Append(v[i].ToString("x2", CultureInfo.InvariantCulture));
            if (j - i > 1)
                sb.Append('*').Append((j - i).ToString(CultureInfo.InvariantCulture));
            i = j;
        }
        return sb.ToString();
    }

    /// <summary>fmt_fill: the result field of a fill ioctl.</summary>
    public static string FormatFill(long? v)
    {
        if (v is null)
            return "untouched";
        if (v < 0)
            return "-" + ((Errno)(int)-v.Value).Name();
        return v.Value.ToString(CultureInfo.InvariantCulture);
    }
}
