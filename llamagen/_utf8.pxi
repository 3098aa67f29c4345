# UTF-8 hold-back: the valid prefix of a sequence's bytes moves to its text, a character
# still arriving stays behind.  Included by _core.pyx (before _seq.pxi, which uses it).


cdef inline int _utf8_len(unsigned char c) noexcept nogil:
    if c < 0x80:
        return 1
    if 0xC2 <= c <= 0xDF:
        return 2
    if 0xE0 <= c <= 0xEF:
        return 3
    if 0xF0 <= c <= 0xF4:
        return 4
    return 0     # continuation byte or invalid lead


cdef inline bint _utf8_cont_ok(unsigned char lead, Py_ssize_t k, unsigned char c) noexcept nogil:
    """Is ``c`` valid as the k-th byte (k >= 1) of a sequence starting with ``lead``?"""
    if k == 1:
        if lead == 0xE0:
            return 0xA0 <= c <= 0xBF
        if lead == 0xED:
            return 0x80 <= c <= 0x9F
        if lead == 0xF0:
            return 0x90 <= c <= 0xBF
        if lead == 0xF4:
            return 0x80 <= c <= 0x8F
    return 0x80 <= c <= 0xBF


cdef size_t _utf8_take(string & raw, string & out, bint final) noexcept nogil:
    """Move the valid UTF-8 prefix of ``raw`` to ``out``; broken sequences become U+FFFD.

    An incomplete character at the end stays in ``raw`` unless ``final``.  Returns bytes consumed.
    """
    cdef size_t i = 0, n = raw.size(), k
    cdef int need
    cdef unsigned char c
    cdef bint ok
    while i < n:
        c = <unsigned char> raw[i]
        need = _utf8_len(c)
        if need == 1:
            out.push_back(<char> c)
            i += 1
            continue
        if need == 0:
            out.append(b"\xef\xbf\xbd")
            i += 1
            continue
        ok = True
        k = 1
        while k < <size_t> need and i + k < n:
            if not _utf8_cont_ok(c, k, <unsigned char> raw[i + k]):
                ok = False
                break
            k += 1
        if not ok:
            out.append(b"\xef\xbf\xbd")    # the lead byte and what followed it so far
            i += k
            continue
        if k < <size_t> need:               # ran out of bytes: the character may still complete
            if not final:
                break
            out.append(b"\xef\xbf\xbd")
            i = n
            break
        out.append(raw, i, need)
        i += need
    raw.erase(0, i)
    return i
