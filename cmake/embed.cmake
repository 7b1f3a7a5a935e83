# Writes the bytes of IN as a C++ array NAME into the header OUT (cmake -P; used for the kernel
# relay's compiled BPF object, proxy/CMakeLists.txt).
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" n)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n  " bytes "${bytes}")
file(WRITE "${OUT}.tmp" "// Generated from ${IN} by cmake/embed.cmake: do not edit.\n#pragma once\n\n"
     "alignas(8) inline constexpr unsigned char ${NAME}[] = {\n  ${bytes}\n};\n")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")
