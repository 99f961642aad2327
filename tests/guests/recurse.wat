;; Recurses without end: wasmtime's stack guard must trap it (not crash the process).
(module
  (memory (export "memory") 1)
  (func $down (param $depth i32)
    (call $down (i32.add (local.get $depth) (i32.const 1))))
  (func (export "_start") (call $down (i32.const 0))))
